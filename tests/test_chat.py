"""nexus chat: streaming, history, commands, pipes and terminals, --prompt, errors."""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import time

import pytest

from nexus import cli
from nexus.chat.session import ChatSession, Sampling, final_answer, harmony_display, run_session
from tiny import make_tokenizer, run_cli, save_adapter_dir, save_model_dir, sigint_default, subprocess_env

GREEDY = Sampling(temperature=0.0, max_new_tokens=5)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    base = save_model_dir(root / "base")
    return {"root": root, "base": base, "adapter": save_adapter_dir(base, root / "adapter", init="random"),
            "plain": save_model_dir(root / "plain", tokenizer=make_tokenizer(chat_template=False))}


@pytest.fixture(scope="module")
def loaded(dirs):
    import nexus
    from transformers import AutoTokenizer

    return nexus.load_model(dirs["adapter"]).eval(), AutoTokenizer.from_pretrained(dirs["base"])


class Recorder(io.StringIO):
    """An output stream that remembers each write (to see text arrive piece by piece)."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_reply_streams_word_by_word(loaded):
    model, tok = loaded
    out = Recorder()
    reply = ChatSession(model, tok, GREEDY, out=out, err=io.StringIO()).reply("the word of")
    assert len(reply.split()) == 5
    pieces = [w for w in out.writes if w.strip()]
    assert len(pieces) >= 4  # one write per finished word, while generating
    assert "".join(out.writes).split() == reply.split()


def test_history_reset_and_system(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, GREEDY, out=io.StringIO(), err=io.StringIO())
    first = session.reply("the word of")
    assert session.history == [{"role": "user", "content": "the word of"}, {"role": "assistant", "content": first}]
    second_prompt = tok.decode(session.prompt_ids("and to")[0])
    assert "the word of" in second_prompt and first in second_prompt
    fresh = ChatSession(model, tok, GREEDY, out=io.StringIO(), err=io.StringIO()).reply("and to")
    assert session.handle("/reset") and session.history == []
    assert session.reply("and to") == fresh  # after /reset the conversation starts over
    assert session.handle("/system be one")
    assert session.system == "be one" and session.history == []
    assert tok.decode(session.prompt_ids("hi")[0]).startswith("<|system|> be one")
    assert session.handle("/exit") is False


def test_run_session_reads_until_exit_or_eof(loaded):
    model, tok = loaded
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(model, tok, GREEDY, out=out, err=err)
    run_session(session, io.StringIO("the word\n\n/bogus\n/exit\nnot read\n"))
    assert len(session.history) == 2 and "unknown command /bogus" in err.getvalue()
    session = ChatSession(model, tok, GREEDY, out=io.StringIO(), err=io.StringIO())
    run_session(session, io.StringIO("the word\nof and"))  # EOF without /exit, last line unterminated
    assert [m["content"] for m in session.history[::2]] == ["the word", "of and"]


def test_no_chat_template_falls_back_to_continuation(dirs):
    import nexus
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dirs["plain"])
    assert not tok.chat_template
    err = io.StringIO()
    session = ChatSession(nexus.load_model(dirs["plain"]), tok, GREEDY, out=io.StringIO(), err=err)
    run_session(session, io.StringIO("the word\n"))
    assert "no chat template" in err.getvalue() and session.history == []
    assert tok.decode(session.prompt_ids("the word")[0]) == "the word"


def test_harmony_final_answer():
    raw = ("<|channel|>analysis<|message|>User greets.<|end|><|start|>assistant<|channel|>final<|message|>"
           "Hello there!<|return|>")
    assert final_answer(raw) == "Hello there!"
    assert final_answer("  plain text ") == "plain text"
    assert harmony_display(raw) == "[analysis] User greets.\n[final] Hello there!"


def test_prompt_once(dirs):
    r = run_cli("chat", "--model", dirs["adapter"], "--prompt", "the word", "--temperature", "0",
                  "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 6


def test_pipe_session(dirs):
    r = run_cli("chat", "--model", dirs["adapter"], "--max-new-tokens", "4", "--seed", "0",
                  input="the word\n/reset\nof and\n/exit\nnever answered\n")
    assert r.returncode == 0, r.stderr
    assert [len(line.split()) for line in r.stdout.splitlines()] == [4, 0, 4, 0]  # a blank line after each reply
    assert "(conversation reset)" in r.stderr


def test_terminal_session(dirs):
    """Driven through a pseudo-terminal: prompt, streamed reply, /exit."""
    leader, follower = os.openpty()
    env = subprocess_env(TERM="dumb")
    proc = subprocess.Popen([sys.executable, "-m", "nexus", "chat", "--model", str(dirs["base"]),
                             "--temperature", "0", "--max-new-tokens", "3"],
                            stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    seen = b""

    def read_until(marker: bytes, timeout: float = 90) -> bytes:
        nonlocal seen
        end = time.time() + timeout
        while marker not in seen:
            ready, _, _ = select.select([leader], [], [], max(0.0, end - time.time()))
            if not ready:
                raise AssertionError(f"timed out waiting for {marker!r}; got {seen!r}")
            try:
                seen += os.read(leader, 4096)
            except OSError:  # the child closed the terminal
                raise AssertionError(f"terminal closed before {marker!r}; got {seen!r}") from None
        head, _, seen = seen.partition(marker)
        return head

    try:
        read_until(b"> ")
        os.write(leader, b"the word\n")
        reply = read_until(b"> ")
        lines = [line for line in reply.decode().replace("\r", "").split("\n") if line.strip()]
        assert lines[0].strip() == "the word"  # the terminal's echo of the input
        assert len(lines[-1].split()) == 3  # the reply
        os.write(leader, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_missing_or_empty_model(dirs, capsys, kind):
    path = dirs["root"] / kind
    if kind == "empty":
        path.mkdir(exist_ok=True)
    with pytest.raises(SystemExit) as exc:
        cli.main(["chat", "--model", str(path), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("error: --model") and str(path) in err
    assert ("no such directory" if kind == "missing" else "no config.json") in err


def test_ctrl_c_during_a_reply_stops_that_reply_not_the_session(loaded, monkeypatch):
    model, tok = loaded
    real, calls = model.generate, []

    def generate(*a, streamer=None, **k):  # the first reply is interrupted after a few words
        calls.append(1)
        if len(calls) == 1:
            streamer.on_finalized_text("partial words ")
            raise KeyboardInterrupt
        return real(*a, streamer=streamer, **k)

    monkeypatch.setattr(model, "generate", generate)
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(model, tok, GREEDY, out=out, err=err)
    run_session(session, io.StringIO("the word\nof and\n"))
    assert "(reply stopped" in err.getvalue() and len(calls) == 2
    assert [m["content"] for m in session.history[::2]] == ["of and"]  # the stopped turn is not kept
    assert out.getvalue().startswith("partial words \n\n")
    with pytest.raises(KeyboardInterrupt):  # outside a session (--prompt), Ctrl-C stops the command
        calls.clear()
        ChatSession(model, tok, GREEDY, out=io.StringIO(), err=io.StringIO()).reply("the word")


def test_a_reply_never_runs_past_the_context(loaded):
    model, tok = loaded
    err = io.StringIO()
    session = ChatSession(model, tok, Sampling(temperature=0.0, max_new_tokens=50), out=io.StringIO(), err=err)
    prompt = session.prompt_ids("the word").shape[1]
    session.max_positions = prompt + 3
    session.reply("the word")
    assert len(session.history[1]["content"].split()) == 3
    assert "replies stop at the model's context" in err.getvalue()
    session = ChatSession(model, tok, Sampling(temperature=0.0), out=io.StringIO(), err=io.StringIO())
    session.max_positions = prompt
    assert session.reply("the word") == "" and "not sent" in session.err.getvalue()


def test_chat_on_the_demo_model_with_default_flags():
    """The bundled model has 256 positions and replies of 128 tokens: a long message gets a reply that
    stops at the context, with no transformers warning in the middle of it."""
    from nexus.demo_data import DEMO_MODEL_DIR

    long_message = " ".join(["def parse(header): return header.split(':')"] * 20)
    r = run_cli("chat", "--model", DEMO_MODEL_DIR, "--seed", "0", input=f"hello\n{long_message}\n", timeout=300)
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert said[0] == "commands: /reset  /system TEXT  /help  /exit", r.stderr
    assert all(line.startswith("(oldest turn dropped") for line in said[1:]), r.stderr  # no "exceeded the maximum"
    assert r.stdout.endswith("\n\n") and r.stdout.count("\n\n") >= 2  # two replies, each followed by a blank line


CTRL_C_MID_REPLY = """
import os, signal, sys, time
from transformers import TextStreamer
put = TextStreamer.put
calls = [0]
def put_then_ctrl_c(self, value):  # the first reply's second streamed piece sends this process a real SIGINT
    calls[0] += 1
    out = put(self, value)
    if calls[0] == 3:  # 1: the prompt, 2 and 3: generated tokens; the reply is under way, whatever the machine's speed
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs here, in the middle of the reply
    return out
TextStreamer.put = put_then_ctrl_c
from nexus.cli import main
main(sys.argv[1:])
"""


def test_a_real_ctrl_c_during_a_reply_keeps_the_session(dirs):
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_MID_REPLY, "chat", "--model", str(dirs["adapter"]),
                             "--seed", "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env(), preexec_fn=sigint_default)
    out, err = proc.communicate(input="the word\nof and\n", timeout=300)  # end of input ends the session
    assert proc.returncode == 0, err[-2000:]
    assert "(reply stopped" in err and "interrupted" not in err.replace("(reply stopped", "")
    turns = out.split("\n\n")
    assert len(turns) == 3 and turns[1].strip() and turns[2] == ""  # the stopped reply, the next one, the end
