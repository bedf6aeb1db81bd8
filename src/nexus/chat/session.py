"""A chat session with a loaded model: the chat template, history, streamed replies, sampling flags.

`ChatSession` renders each turn with the tokenizer's own chat template (GPT-OSS: the harmony format)
and streams the reply; `run_session` reads commands and prompts line by line; `start_chat` is what
`nexus chat` and `nexus validate --chat` run on their loaded model.
"""


from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import IO, Iterator

import torch

from ..defaults import DEFAULT_MAX_NEW_TOKENS, max_positions

HELP = "commands: /reset  /system TEXT  /help  /exit"
HARMONY_FINAL = "<|channel|>final<|message|>"  # GPT-OSS: the answer follows the analysis channel
HARMONY_STOPS = ("<|return|>", "<|end|>", "<|call|>")


@dataclass
class Sampling:
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    max_new_tokens: int | None = None  # None: the model's generation_config, else 512; within its context


def is_harmony(tokenizer) -> bool:
    """GPT-OSS's harmony format: replies carry channels (analysis = reasoning, final = the answer)."""
    return "<|channel|>" in tokenizer.get_vocab()


def harmony_display(text: str) -> str:
    """Harmony markup made readable: `[analysis] ...` then `[final] ...`; other special tokens dropped."""
    text = re.sub(r"<\|start\|>\w+", "\n", text)
    text = re.sub(r"<\|channel\|>(\w+)[^<]*(?:<\|constrain\|>[^<]*)?<\|message\|>", r"[\1] ", text)
    return re.sub(r"<\|[a-z_]+\|>", "", text)


def _streamer(tokenizer, out: IO[str]):
    from transformers import TextStreamer

    harmony = is_harmony(tokenizer)

    class Streamer(TextStreamer):
        """TextStreamer writing whole words to `out` as they are generated (harmony markup kept whole
        in each piece: a piece ends at a space and the markers contain none, so it can be rewritten)."""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write((harmony_display(text) if harmony else text) + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=not harmony)


def final_answer(raw: str) -> str:
    """The assistant content to keep in the history: for harmony output, only the final channel."""
    if HARMONY_FINAL in raw:
        raw = raw.rsplit(HARMONY_FINAL, 1)[1]
        for stop in HARMONY_STOPS:
            raw = raw.split(stop, 1)[0]
    return raw.strip()


class ChatSession:
    """A conversation with `model`: the history, the system prompt, and generation with streaming."""

    def __init__(self, model, tokenizer, sampling: Sampling | None = None, system: str | None = None,
                 out: IO[str] | None = None, err: IO[str] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling or Sampling()
        self.system = system
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.history: list[dict] = []
        self.stop_reply_on_interrupt = False  # a session (run_session): Ctrl-C stops the reply, not the session
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.max_positions = max_positions(model)
        self._clip_noted = False
        # the model's own reply length (generation_config.json), else ours
        self.default_new = getattr(getattr(model, "generation_config", None), "max_new_tokens", None) \
            or DEFAULT_MAX_NEW_TOKENS

    def messages(self, user_text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": user_text}]

    def prompt_ids(self, user_text: str) -> torch.Tensor:
        """Token ids (1, L) of the whole conversation plus `user_text`, ready for the reply."""
        if not self.templated:
            ids = self.tokenizer(user_text, return_tensors="pt")["input_ids"]
            return ids if ids.shape[1] else torch.tensor([[self.tokenizer.eos_token_id]])
        enc = self.tokenizer.apply_chat_template(self.messages(user_text), add_generation_prompt=True,
                                                 tokenize=True, return_dict=True, return_tensors="pt")
        return enc["input_ids"]

    def _reserve(self) -> int:
        """Tokens a reply should have room for: the asked length, at most half the context by default."""
        asked = self.sampling.max_new_tokens
        if asked is not None:
            return min(asked, self.max_positions - 1) if self.max_positions else asked
        return min(self.default_new, self.max_positions // 2) if self.max_positions else self.default_new

    def _fit(self, user_text: str) -> torch.Tensor:
        """Prompt ids; the oldest turns are dropped while the prompt leaves no room for the reply."""
        ids = self.prompt_ids(user_text)
        while self.max_positions and ids.shape[1] + self._reserve() > self.max_positions \
                and len(self.history) >= 2:
            self.history = self.history[2:]
            self.err.write("(oldest turn dropped: the conversation no longer fits the context)\n")
            ids = self.prompt_ids(user_text)
        return ids

    def reply_length(self, prompt_len: int) -> int:
        """New tokens for a reply to a prompt of `prompt_len` tokens: --max-new-tokens (default: the
        model's generation_config, else DEFAULT_MAX_NEW_TOKENS), never past its context."""
        asked = self.sampling.max_new_tokens
        length = self.default_new if asked is None else asked
        if self.max_positions:
            room = self.max_positions - prompt_len
            if asked is not None and asked > room and not self._clip_noted:
                self.err.write(f"(--max-new-tokens {asked}: replies stop at the model's context of "
                               f"{self.max_positions} tokens)\n")
                self._clip_noted = True
            length = min(length, room)
        return length

    def reply(self, user_text: str) -> str:
        """Generate the answer to `user_text`, streaming it to `out`; the turn joins the history."""
        ids = self._fit(user_text)
        length = self.reply_length(ids.shape[1])
        if length < 1:
            self.err.write(f"(not sent: the message takes {ids.shape[1]} tokens, the model's whole context of "
                           f"{self.max_positions}; /reset or write less)\n")
            self.err.flush()
            return ""
        device = self.model.get_input_embeddings().weight.device
        ids = ids.to(device)  # (1, L)
        s = self.sampling
        kwargs = dict(max_new_tokens=length, do_sample=s.temperature > 0)
        if s.temperature > 0:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        try:
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=pad,
                                          streamer=_streamer(self.tokenizer, self.out), **kwargs)
        except KeyboardInterrupt:
            if not self.stop_reply_on_interrupt:
                raise
            self.out.write("\n")
            self.out.flush()
            self.err.write("(reply stopped; this turn is not kept in the conversation — /exit or end of input "
                           "ends the session)\n")
            self.err.flush()
            return ""
        new = out[0, ids.shape[1]:]  # (N,) generated tokens
        raw = self.tokenizer.decode(new, skip_special_tokens=False)
        text = final_answer(raw) if HARMONY_FINAL in raw else self.tokenizer.decode(new, skip_special_tokens=True).strip()
        if self.templated:
            self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        return text

    def reset(self) -> None:
        self.history = []

    def handle(self, line: str) -> bool:
        """Process one input line (a command or a message). False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/exit", "/quit"):
                return False
            if command == "/reset":
                self.reset()
                self.err.write("(conversation reset)\n")
            elif command == "/system":
                self.system = rest.strip() or None
                self.reset()
                self.err.write(f"(system prompt {'set' if self.system else 'cleared'}; conversation reset)\n")
            elif command == "/help":
                self.err.write(HELP + "\n")
            else:
                self.err.write(f"unknown command {command}; {HELP}\n")
            self.err.flush()
            return True
        self.reply(line)
        return True


def read_lines(stream: IO[str], out: IO[str], prompt: str = "> ") -> Iterator[str]:
    """Input lines until EOF. On a terminal shows `prompt` (with line editing); from a pipe reads silently."""
    interactive = stream.isatty() and out.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (arrow keys and history for input())
        except ImportError:
            pass
    while True:
        if interactive:
            try:
                yield input(prompt)
            except EOFError:
                out.write("\n")
                return
        else:
            line = stream.readline()
            if not line:
                return
            yield line.rstrip("\r\n")


def run_session(session: ChatSession, stream: IO[str] | None = None) -> None:
    """Chat until /exit or end of input."""
    stream = stream or sys.stdin
    session.stop_reply_on_interrupt = True
    separate = not session.out.isatty()  # a pipe or file: a blank line after each reply tells turns apart
    if not session.templated:
        session.err.write("note: this model's tokenizer has no chat template; each input is continued "
                          "as plain text, without conversation history\n")
    session.err.write(HELP + "\n")
    session.err.flush()
    for line in read_lines(stream, session.out):
        if not session.handle(line):
            break
        if separate and line.strip() and not line.strip().startswith("/"):
            session.out.write("\n")
            session.out.flush()


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    d = Sampling()
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"sampling temperature; 0 = greedy (default {d.temperature})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"nucleus sampling mass (default {d.top_p})")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"longest reply in tokens (default: the model's generation_config max_new_tokens, else "
                        f"{DEFAULT_MAX_NEW_TOKENS}; a reply never runs past the model's context)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    p.add_argument("--system", default=None, help="system prompt")


def sampling_from_args(args) -> Sampling:
    from ..errors import NexusError

    if args.temperature < 0:
        raise NexusError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise NexusError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise NexusError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    return Sampling(args.temperature, args.top_p, args.max_new_tokens)


def start_chat(model, model_path: str, args, stream: IO[str] | None = None) -> None:
    """Interactive chat (or one `--prompt` answer) with an already loaded model; used by validate --chat."""
    from ..data import load_tokenizer

    tokenizer = load_tokenizer(model_path, trust_remote_code=args.trust_remote_code)
    session = ChatSession(model, tokenizer, sampling_from_args(args), system=args.system)
    if getattr(args, "prompt", None) is not None:
        if not session.templated:
            session.err.write("note: no chat template; continuing the prompt as plain text\n")
        session.reply(args.prompt)
        return
    run_session(session, stream)
