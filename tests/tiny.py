"""Tiny on-disk assets for tests (no downloads): one tokenizer, model and adapter directories, datasets, and
helpers to run the CLI the way a user would.

The tokenizer is word-level: one token per word, so a test can count a reply's tokens by its words. Ids
0..7 are special (pad 0, eos 1, bos 2, unk 3, then the chat roles and the end of a turn), the words
follow; `make_tokenizer(vocab_size)` keeps the first `vocab_size` entries, so a smaller vocabulary is a
prefix of the usual one (same specials, fewer words). The tiny models (conftest) have VOCAB = 96 entries.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, tiny_model

ROOT = Path(__file__).resolve().parents[1]

SPECIALS = ["<pad>", "</s>", "<s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# The patterned sentences' words come first (so every vocabulary of 26 entries or more holds them), then
# common English words up to the tiny models' vocabulary.
SUBJECTS, VERBS, PLACES, THINGS = ["cat", "dog", "bird", "fish"], ["sat", "ran", "flew", "swam"], \
    ["on", "in", "under", "over"], ["mat", "log", "tree", "pond"]
_FILL = ("red blue green small big one two three and then of to is it that was for are with as his they be at "
         "have this from or had by word but what some we can out other were all there when up use your how said "
         "an each she which do their time if will way about many them write would like so these her long make "
         "thing see him has look more day could go come did number").split()
WORDS = (["the", "."] + SUBJECTS + VERBS + PLACES + THINGS + _FILL)[:VOCAB - len(SPECIALS)]
assert len(set(WORDS)) == len(WORDS) == VOCAB - len(SPECIALS)
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


# --- tokenizer, model and adapter directories ---------------------------------------------------------

def make_tokenizer(vocab_size: int = VOCAB, chat_template: bool = True):
    """The word-level tokenizer: SPECIALS then WORDS, `vocab_size` entries in all."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate((SPECIALS + WORDS)[:vocab_size])}
    assert len(vocab) == vocab_size, f"at most {len(SPECIALS) + len(WORDS)} entries"
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                  unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tokenizer(directory: str | os.PathLike, **kw) -> Path:
    """Save `make_tokenizer(**kw)` to `directory`."""
    make_tokenizer(**kw).save_pretrained(str(directory))
    return Path(directory)


def save_model_dir(directory: str | os.PathLike, family: str = "qwen3_moe", seed: int = 0, tokenizer=None,
                   **overrides) -> Path:
    """A tiny random model of `family` (config `overrides`) with a tokenizer (default: `make_tokenizer()`).

    Generation never ends early nor emits special tokens (they are suppressed), so a reply of N new
    tokens is N words.
    """
    model = tiny_model(family, seed=seed, **overrides)
    model.generation_config.suppress_tokens = list(range(len(SPECIALS)))
    model.generation_config.eos_token_id = 1
    model.save_pretrained(str(directory))
    (tokenizer or make_tokenizer()).save_pretrained(str(directory))
    return Path(directory)


def save_adapter_dir(base_dir: str | os.PathLike, directory: str | os.PathLike, init: str = "zero",
                     scale: float = 1.0, seed: int = 0) -> Path:
    """An adapter over the saved base (loaded from disk, so the adapter records its path)."""
    import nexus
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    nexus.attach_shared_experts(model, init=init, seed=seed, scale=scale)
    nexus.save_adapter(model, directory)
    return Path(directory)


def base_state(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer that belongs to the base (not NEXUS's), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "nexus_" not in k}


# --- text and datasets ----------------------------------------------------------------------------------

def random_text(rng: random.Random, low: int = 1, high: int = 40) -> str:
    """`low`..`high` words drawn from a random-sized prefix of WORDS (unlearnable, varied lengths)."""
    return " ".join(rng.choice(WORDS[: 10 + rng.randrange(len(WORDS) - 10)]) for _ in range(rng.randint(low, high)))


def sentences(n: int, seed: int = 0) -> list[str]:
    """Patterned (learnable) texts of 2-4 sentences of 7 tokens: "the cat sat on the mat ."."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(2, 4)):
            words += ["the", rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(PLACES), "the",
                      rng.choice(THINGS), "."]
        out.append(" ".join(words))
    return out


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def write_text_dataset(path: str | os.PathLike, n: int = 48, seed: int = 0) -> Path:
    """`n` patterned sentences as {"text": ...} records."""
    return write_jsonl(path, [{"text": s} for s in sentences(n, seed)])


def write_word_dataset(path: str | os.PathLike, n: int, seed: int) -> Path:
    """`n` records of 30 filler words in no pattern: general text that the patterned sentences do not teach."""
    rng = random.Random(seed)
    return write_jsonl(path, [{"text": " ".join(rng.choices(_FILL, k=30))} for _ in range(n)])


def write_chat_dataset(path: str | os.PathLike, n: int = 16, seed: int = 1) -> Path:
    """`n` {"messages": [user, assistant]} records, each a patterned sentence cut in two."""
    records = []
    for s in sentences(n, seed):
        half = len(s) // 2
        records.append({"messages": [{"role": "user", "content": s[:half]},
                                     {"role": "assistant", "content": s[half:]}]})
    return write_jsonl(path, records)


def write_datasets(directory: str | os.PathLike) -> dict[str, Path]:
    """Two held-out sets of random words: general.txt (one document of 60 words) and domain.jsonl (four
    documents of 9, 30, 17 and 5 words)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())

    txt = directory / "general.txt"
    txt.write_text(text(60))
    jsonl = write_jsonl(directory / "domain.jsonl", [{"text": text(n)} for n in (9, 30, 17, 5)])
    return {"general": txt, "domain": jsonl}


def train_in_process(cfg, steps: int | None = None):
    """`nexus.train.recipe.Trainer(cfg)` run in this process to the end, or stopped after `steps` optimizer
    steps as a kill would (no final/); returns the trainer."""
    from nexus.train.recipe import Trainer

    t = Trainer(cfg)
    try:
        t.setup()
        if steps is None:
            t.train()
        else:
            for _ in range(steps):
                t.train_step()
    finally:
        t.cleanup()
    return t


# --- threads ----------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models train fastest on one thread: more oversubscribe a small shared machine (often 10×+).

    Import this into a test module to make it autouse there; the previous setting is restored after.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- running the CLI --------------------------------------------------------------------------------------

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
