"""Defaults that depend on the model are taken from it: sequence length (collect, sample, train,
precompute-teacher, validate) and reply length (chat), unless the flag is given."""

from __future__ import annotations

import json

from nexus.defaults import DEFAULT_SEQ_LEN, max_positions_at, seq_len_for
from nexus.demo_data import DEMO_MODEL_DIR
from nexus.stats.accumulate import RouterStats
from tiny import run_main, save_model_dir, write_text_dataset
from tiny import single_thread  # noqa: F401


def test_seq_len_is_capped_at_the_models_positions(tmp_path):
    assert max_positions_at(DEMO_MODEL_DIR) == 256
    assert seq_len_for(DEMO_MODEL_DIR, None) == 256 and seq_len_for(DEMO_MODEL_DIR, 64) == 64
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "nexus_config.json").write_text(json.dumps({"base_model_name_or_path": str(DEMO_MODEL_DIR)}))
    assert seq_len_for(adapter, None) == 256  # an adapter directory: its base's config
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({"max_position_embeddings": 131072}))
    assert seq_len_for(big, None) == DEFAULT_SEQ_LEN
    assert seq_len_for(tmp_path / "missing", None) == DEFAULT_SEQ_LEN  # unknown: the usual default


def test_collect_and_train_fit_a_short_context_by_default(tmp_path):
    model = save_model_dir(tmp_path / "model")  # 128 positions: the old default 1024 was refused
    data = write_text_dataset(tmp_path / "data.jsonl", n=48)
    r = run_main("collect", "--model", model, "--dataset", data, "--target-tokens", 200, "--device", "cpu",
                 "--output", tmp_path / "s.safetensors")
    assert r.returncode == 0, r.stderr
    assert RouterStats.load(tmp_path / "s.safetensors")[0].tokens == 200
    r = run_main("train", "--student-model", model, "--init-strategy", "random", "--dataset", data, "--max-steps", 1,
                 "--device", "cpu", "--output-dir", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    run = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert run["config"]["seq_len"] == 128
