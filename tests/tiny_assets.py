"""Tiny on-disk assets for CLI tests: a word-level tokenizer and tiny models saved beside it (no downloads)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(90)]  # ids 4..93, inside the tiny models' vocabulary of 96
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"


def save_tiny_tokenizer(directory: str | os.PathLike) -> Path:
    """A word-level tokenizer over WORDS (pad 0, eos 1, bos 2, unk 3) with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                  unk_token="<unk>", chat_template=CHAT_TEMPLATE)
    tok.save_pretrained(str(directory))
    return Path(directory)


def save_tiny_model(family: str, directory: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """A tiny random model of `family` with the tiny tokenizer, saved as a model directory."""
    from conftest import tiny_model

    model = tiny_model(family, seed=seed, **overrides)
    model.save_pretrained(str(directory))
    save_tiny_tokenizer(directory)
    return Path(directory)


def random_text(rng: random.Random, low: int = 1, high: int = 40) -> str:
    return " ".join(rng.choice(WORDS[: 10 + rng.randrange(80)]) for _ in range(rng.randint(low, high)))


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def subprocess_env(**extra) -> dict:
    """The environment of a CLI subprocess: offline, this worktree's package, one thread."""
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS="1", **extra)


def sigint_default() -> None:
    """`preexec_fn` for a child that must receive Ctrl-C: a shell without job control starts background jobs
    with SIGINT ignored, the child would inherit that, and Python then installs no KeyboardInterrupt handler."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_after_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 300) -> int:
    """SIGKILL a training run once its metrics.jsonl has reached `step`; returns the last step it logged."""
    import signal
    import time

    from nexus.train.metrics import read_metrics

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        rows = read_metrics(metrics)
        if rows and rows[-1]["step"] >= step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    return read_metrics(metrics)[-1]["step"]


def nexus_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "nexus", *map(str, args)]


def run_cli(*args, input: str | None = None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """Run `python -m nexus ARGS` the way a user would (offline, package from this worktree)."""
    return subprocess.run(nexus_cmd(*args), input=input, capture_output=True, text=True, env=subprocess_env(),
                          cwd=cwd, timeout=timeout)


def run_main(*args) -> subprocess.CompletedProcess:
    """Run the CLI in this process (cheaper than a subprocess; same parsing, errors and exit codes)."""
    import contextlib
    import io

    from nexus.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


# Tiny models run a stage in a blink: wrappers that sleep after each call of the named functions
# widen the window a kill has to land in.
SLOWED = """
import importlib, sys, time
module, seconds, names = importlib.import_module(sys.argv[1]), float(sys.argv[2]), sys.argv[3].split(",")
def slowed(f):
    def g(*a, **k):
        out = f(*a, **k)
        time.sleep(seconds)
        return out
    return g
for name in names:
    setattr(module, name, slowed(getattr(module, name)))
from nexus.cli import main
main(sys.argv[4:])
"""


def slowed(module: str, seconds: float, names: list[str], *args) -> list[str]:
    """A command running `nexus ARGS` with `module.NAME` sleeping `seconds` after each call."""
    return [sys.executable, "-c", SLOWED, module, str(seconds), ",".join(names), *map(str, args)]
