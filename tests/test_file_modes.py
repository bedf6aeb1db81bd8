"""Outputs are created with the user's umask (0666/0777 less it), though written to private temporaries."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest
import yaml

from nexus.fsutil import atomic_dir, atomic_path, umask, write_json
from nexus.pipeline.runner import load_pipeline_config, run_pipeline
from tiny import random_text, save_model_dir, write_jsonl


@pytest.fixture
def with_umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """{relative path: permission bits} of everything under `root` (the root itself included)."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[p.relative_to(root).as_posix()] = stat.S_IMODE(p.stat().st_mode)
    return out


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o027, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, with_umask, mask):
    with_umask(mask)
    assert umask() == mask
    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"x")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "inner.txt").write_text("x")
        write_json(tmp / "inner.json", {})
    files, dirs = 0o666 & ~mask, 0o777 & ~mask
    assert modes(tmp_path / "d") == {".": dirs, "inner.txt": files, "inner.json": files}
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == files
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == files


def test_every_pipeline_output_follows_the_umask(tmp_path, with_umask):
    """The whole pipeline on a tiny model with umask 027: files 0640, folders 0750, none private."""
    save_model_dir(tmp_path / "model", "gpt_oss")
    rng = random.Random(0)
    write_jsonl(tmp_path / "data.jsonl", [{"text": random_text(rng, 8, 40)} for _ in range(40)])
    cfg = {"model": str(tmp_path / "model"), "dataset": str(tmp_path / "data.jsonl"), "work_dir": str(tmp_path / "out"),
           "stages": {"sample": {"target_tokens": 300, "max_candidates": 40, "seq_len": 32},
                      "collect": {"target_tokens": 300, "seq_len": 32, "flush_every": 1},
                      "analyze": {"top_k": 2}, "convert": {"init_strategy": "pca_top2"},
                      "train": {"max_steps": 2, "batch_size": 2, "seq_len": 16, "checkpoint_interval": 1},
                      "validate": {"dataset": [str(tmp_path / "data.jsonl")], "compute_perplexity": True,
                                   "num_samples": 2, "seq_len": 16}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    with_umask(0o027)
    run_pipeline(load_pipeline_config(tmp_path / "p.yaml"), tmp_path)
    found = modes(tmp_path / "out")
    for name in ("sample.jsonl", "router_stats.safetensors", "pca_stats.json", "adapter/nexus_adapter.safetensors",
                 "train/checkpoint-1/nexus_adapter.safetensors", "train/final/nexus_config.json",
                 "validation/report.json", "validation/report.md"):
        assert found[name] == 0o640, (name, oct(found[name]))
    wrong = {name: oct(mode) for name, mode in found.items()
             if mode != (0o750 if (tmp_path / "out" / name).is_dir() else 0o640)}
    assert wrong == {}
