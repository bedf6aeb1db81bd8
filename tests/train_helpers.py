"""Tiny model directories with a real (tiny) tokenizer, and small datasets, for train / teacher tests.

Everything is built locally: a word-piece-free BPE tokenizer trained with `tokenizers` on a fixed
corpus (vocabulary = the tiny config's 96 tokens), saved as PreTrainedTokenizerFast next to the model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, tiny_model

WORDS = ("the cat dog bird fish sat ran flew swam on in under over mat log tree pond red blue green small big "
         "one two three and then").split()
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models train fastest on one thread: more oversubscribe a small shared machine (often 10×+).

    Import this into a test module to make it autouse there; the previous setting is restored after.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sentences(n: int, seed: int = 0) -> list[str]:
    """Patterned sentences (learnable) of 8-24 words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(2, 4)):
            words += ["the", rng.choice(WORDS[1:5]), rng.choice(WORDS[5:9]), rng.choice(WORDS[9:13]), "the",
                      rng.choice(WORDS[13:17]), "."]
        out.append(" ".join(words))
    return out


def make_tokenizer(vocab_size: int = VOCAB):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  show_progress=False)
    corpus = sentences(200, seed=123) + [" ".join(WORDS)] + ["<user> <assistant> hello world ?\n0123456789"]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) <= vocab_size, len(fast)
    return fast


def make_model_dir(path: Path, family: str = "qwen3_moe", seed: int = 0, tokenizer=None, **overrides) -> Path:
    """Save a tiny random model of `family` plus a tokenizer to `path`."""
    model = tiny_model(family, seed=seed, **overrides)
    model.save_pretrained(path)
    (tokenizer or make_tokenizer()).save_pretrained(path)
    return path


def write_text_dataset(path: Path, n: int = 48, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for s in sentences(n, seed):
            f.write(json.dumps({"text": s}) + "\n")
    return path


def write_chat_dataset(path: Path, n: int = 16, seed: int = 1) -> Path:
    with open(path, "w") as f:
        for s in sentences(n, seed):
            half = len(s) // 2
            f.write(json.dumps({"messages": [{"role": "user", "content": s[:half]},
                                             {"role": "assistant", "content": s[half:]}]}) + "\n")
    return path


def base_state(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer that belongs to the base (not NEXUS's), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "nexus_" not in k}
