"""The bundled demo model and its corpus: loads offline, is a real GPT-OSS MoE, and has learned."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from nexus import demo_data
from nexus.demo_data import DEMO_MODEL_DIR, SPLITS

MAX_WEIGHTS_BYTES = 20 * 1000 * 1000


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, local_files_only=True).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)


def test_splits_are_disjoint_and_cover_the_corpus():
    files = {split: demo_data.stdlib_files(split) for split in SPLITS}
    everything = demo_data.stdlib_files()
    assert sum(len(f) for f in files.values()) == len(everything) == len(set(everything))
    assert set().union(*files.values()) == set(everything)
    for split, names in files.items():
        assert names, split
        assert all(demo_data.area_of(f) == split.split("_")[0] for f in names)


def test_splits_are_deterministic():
    before = {split: demo_data.stdlib_files(split) for split in SPLITS}
    demo_data._split_map.cache_clear()
    assert {split: demo_data.stdlib_files(split) for split in SPLITS} == before
    # The rule depends on the relative path only (sha256), never on Python's salted hash().
    assert demo_data.path_key("asyncio/tasks.py") == hashlib.sha256(b"asyncio/tasks.py").digest()


def test_corpus_skips_what_not_every_install_has():
    for f in demo_data.stdlib_files():
        parts = f.split("/")
        assert parts[0] not in {"test", "idlelib", "tkinter", "turtledemo", "site-packages", "lib2to3"}, f
        assert "test" not in parts[:-1] and "tests" not in parts[:-1], f


def test_held_out_domain_is_large_enough():
    splits = demo_data.describe_corpus()["splits"]
    assert splits["domain_train"]["bytes"] >= 300_000
    assert splits["domain_eval"]["bytes"] >= 50_000
    assert splits["general_train"]["bytes"] > 10 * splits["domain_train"]["bytes"]


def test_write_split_is_jsonl_with_text(tmp_path):
    out = tmp_path / "domain_eval.jsonl"
    n = demo_data.write_split("domain_eval", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == len(rows) == len(demo_data.stdlib_texts("domain_eval"))
    assert all(r["text"].strip() and demo_data.area_of(r["path"]) == "domain" for r in rows)
    with pytest.raises(ValueError, match="unknown split"):
        demo_data.stdlib_files("train")


def test_shipped_model_is_a_small_gpt_oss_moe(model):
    from transformers import GptOssForCausalLM

    assert isinstance(model, GptOssForCausalLM)
    cfg = model.config
    assert cfg.num_local_experts >= 16 and 1 < cfg.num_experts_per_tok < cfg.num_local_experts
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert cfg.sliding_window < cfg.max_position_embeddings
    assert not cfg.output_router_logits  # the aux loss was a pretraining concern
    weights = DEMO_MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size <= MAX_WEIGHTS_BYTES
    assert not any(DEMO_MODEL_DIR.glob("*.bin"))


def test_tokenizer_and_chat_template(tokenizer, model):
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.pad_token_id == model.config.pad_token_id
    assert tokenizer.eos_token_id == model.config.eos_token_id
    for marker in ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"):
        assert len(tokenizer(marker, add_special_tokens=False).input_ids) == 1, marker
    text = "def main():\n    return email.message_from_string(raw)  # naïve\n"
    assert tokenizer.decode(tokenizer(text).input_ids) == text  # byte-level: lossless
    messages = [{"role": "user", "content": "What does os.path.join do?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>\nWhat does os.path.join do?<|end|>\n<|assistant|>\n"


def test_shipped_model_has_learned_the_stdlib(model, tokenizer):
    # A few 256-token blocks of held-out general files, packed as in pretraining (EOS between files).
    stream = []
    for ids in tokenizer(demo_data.stdlib_texts("general_eval")[:8]).input_ids:
        stream += ids + [tokenizer.eos_token_id]
    ids = torch.tensor(stream[: 4 * 256]).view(4, 256)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 0.6 * math.log(model.config.vocab_size)  # uniform guessing is ln(V)


def test_model_card_reports_the_run():
    report = json.loads((DEMO_MODEL_DIR / "pretraining.json").read_text())
    card = (DEMO_MODEL_DIR / "README.md").read_text()
    ev = report["eval"]
    assert ev["domain_eval"]["loss"] > ev["general_eval"]["loss"]  # the held-out domain is harder
    assert f"{report['final_train_lm_loss']:.4f}" in card
    assert f"{ev['general_eval']['perplexity']:.2f}" in card and f"{ev['domain_eval']['perplexity']:.2f}" in card
    assert "python3 scripts/pretrain_demo.py" in card
    # The report describes exactly the weights that ship.
    weights = (DEMO_MODEL_DIR / "model.safetensors").read_bytes()
    assert report["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    layers = ev["general_eval"]["layers"]
    assert len(layers) == json.loads((DEMO_MODEL_DIR / "config.json").read_text())["num_hidden_layers"]
    for stats in layers.values():
        assert 0 < stats["router_entropy"] <= stats["max_entropy"]
        assert 0 < stats["top4_share"] <= 1
