"""On-disk tiny models for CLI tests: a word-level tokenizer with a chat template, base and adapter dirs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import VOCAB, tiny_model

SPECIALS = ["<pad>", "</s>", "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "[UNK]"]
WORDS = ("the of and to in is it that was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do "
         "their time if will way about many then them write would like so these her long make thing see him "
         "two has look more day could go come did number sound no most people my over know water than call "
         "first who may down side been now find").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_tokenizer(directory: Path, chat_template: bool = True):
    """A word-level tokenizer whose ids fit the tiny models' vocabulary (ids 0..7 special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS[:VOCAB - len(SPECIALS)]
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="[UNK]", additional_special_tokens=SPECIALS[3:7])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def save_base(directory: Path, family: str = "qwen3_moe", chat_template: bool = True, seed: int = 0):
    """Save a tiny model + tokenizer; generation never ends early (special tokens suppressed)."""
    model = tiny_model(family, seed=seed)
    model.generation_config.suppress_tokens = list(range(len(SPECIALS)))
    model.generation_config.eos_token_id = 1
    model.save_pretrained(directory)
    save_tokenizer(directory, chat_template)
    return directory


def save_adapter_dir(base_dir: Path, directory: Path, init: str = "zero", scale: float = 1.0, seed: int = 0):
    """An adapter over the saved base (loaded from disk, so the adapter records its path)."""
    import nexus
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    nexus.attach_shared_experts(model, init=init, seed=seed, scale=scale)
    nexus.save_adapter(model, directory)
    return directory


def write_datasets(directory: Path) -> dict[str, Path]:
    """A .txt and a .jsonl held-out set made of the tokenizer's words."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    words = WORDS[:VOCAB - len(SPECIALS)]

    def text(n):
        return " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist())

    txt = directory / "general.txt"
    txt.write_text(text(60))
    jsonl = directory / "domain.jsonl"
    with open(jsonl, "w") as f:
        for n in (9, 30, 17, 5):
            f.write(json.dumps({"text": text(n)}) + "\n")
    return {"general": txt, "domain": jsonl}
