"""`nexus convert` on the command line: a real run, the seeds' flag spellings, and bad inputs.

Each bad input must give a clear error naming the file or flag, a non-zero exit, and no output
directory (nor a leftover temporary one).
"""

import json
import re

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from test_convert import write_pca_stats
from test_convert_checkpoint import write_mxfp4_gpt_oss

import tiny

import nexus
from nexus.cli import main

def run_cli(*args):
    return tiny.run_cli("convert", *args)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "gpt-oss-mxfp4"
    write_mxfp4_gpt_oss(d)
    return d


@pytest.fixture
def stats(tmp_path):
    return write_pca_stats(tmp_path / "pca_stats.json")


def test_cli_converts_with_the_seed_flags(base, stats, tmp_path):
    out = tmp_path / "nexus-model"
    r = run_cli("--input", base, "--output", out, "--router-stats", stats, "--init-strategy", "pca_top3")
    assert r.returncode == 0, r.stderr
    assert "convert: 100%" in r.stderr and "2/2" in r.stderr and "layer 1," in r.stderr  # the progress bar
    assert "sanity check: 8 tokens" in r.stdout and "converted 2 MoE layers (pca_top3): 6 experts" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["nexus_adapter.safetensors", "nexus_config.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    model = nexus.load_model(out, dtype=torch.float32)
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_cli_failure_exits_nonzero(base, stats, tmp_path):
    r = run_cli("--model", base, "--output-dir", tmp_path / "out", "--pca-stats", stats, "--init-strategy", "pca_best")
    assert r.returncode == 2 and r.stderr.startswith("error: --init-strategy 'pca_best': unknown init strategy")
    assert not (tmp_path / "out").exists()


def copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _bad_stats(tmp_path, **changes):
    data = {"format": "nexus-pca-stats", "version": 1, "num_experts": 8,
            "layers": {"0": {"selected_experts": [1, 2], "weights": [0.5, 0.5]},
                       "1": {"selected_experts": [3, 4], "weights": [0.5, 0.5]}}}
    data.update(changes)
    path = tmp_path / "bad_stats.json"
    path.write_text(json.dumps(data))
    return path


def _nan_expert(base, tmp_path):
    """A checkpoint whose expert 1 of layer 0 has E8M0 scale 255 (NaN) — as a corrupted download might."""
    d = copy_dir(base, tmp_path / "nan-base")
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.0.mlp.experts.down_proj_scales"
    shard = d / index[key]
    tensors = load_file(str(shard))
    tensors[key][1, 0, 0] = 255
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return d


def _nan_base(tmp_path):
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("inf")  # the base itself yields non-finite logits
    model.save_pretrained(tmp_path / "inf-base")
    return tmp_path / "inf-base"


def _shard(base, tmp_path, damage):
    d = copy_dir(base, tmp_path / "damaged")
    shard = d / "model-00001-of-00001.safetensors"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:-64])
    return d


def _router_stats(tmp_path):
    from nexus.stats.accumulate import RouterStats

    path = tmp_path / "router_stats.safetensors"
    RouterStats([0, 1], 8, 2, "gpt_oss", "m").save(path)
    return path


def _binary(tmp_path):
    path = tmp_path / "pca.bin"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    return path


BAD = {
    "router statistics as pca stats": (
        lambda base, t: dict(stats=_router_stats(t)),
        r"--pca-stats .*router_stats\.safetensors: a safetensors file \(router statistics from `nexus collect`\?\), "
        r"not a pca_stats\.json; make one with: nexus analyze --input .*router_stats\.safetensors"),
    "binary pca stats": (lambda base, t: dict(stats=_binary(t)),
                         r"pca\.bin: binary data \(byte 0 is not UTF-8\), not JSON; expected a pca_stats\.json"),
    "expert count": (lambda base, t: dict(stats=_bad_stats(t, num_experts=16)),
                     r"--pca-stats .*bad_stats\.json: made for 16 experts per layer, the model has 8"),
    "layers": (lambda base, t: dict(stats=_bad_stats(t, layers={"0": {"selected_experts": [1], "weights": [1.0]}})),
               r"--pca-stats .*bad_stats\.json: has layers \[0\], the model's MoE layers are \[0, 1\]"),
    "expert index": (lambda base, t: dict(stats=_bad_stats(t, layers={
        "0": {"selected_experts": [1, 9], "weights": [0.5, 0.5]}, "1": {"selected_experts": [1], "weights": [1.0]}})),
        r"layer 0: selected_experts must be expert indices in \[0, 8\)"),
    "too few experts": (lambda base, t: dict(strategy="pca_top5"),
                        r"--init-strategy pca_top5: asks for 5 experts, but --pca-stats .* selects only 4 in layer 0"),
    "unknown strategy": (lambda base, t: dict(strategy="median_top3"), r"--init-strategy 'median_top3': unknown"),
    "no stats": (lambda base, t: dict(stats=None), r"--init-strategy pca_top3 merges .*: pass --pca-stats"),
    "missing shard": (lambda base, t: dict(base=_shard(base, t, "missing")),
                      r"damaged/model-00001-of-00001\.safetensors: shard listed in "
                      r"model\.safetensors\.index\.json is missing"),
    "truncated shard": (lambda base, t: dict(base=_shard(base, t, "truncate")),
                        r"damaged/model-00001-of-00001\.safetensors: truncated or corrupted safetensors file"),
    "nan expert": (lambda base, t: dict(base=_nan_expert(base, t)), r"layer 0 \(pca_top3\): .* NaN/Inf"),
    "nan forward": (lambda base, t: dict(base=_nan_base(t), strategy="zero"),
                    r"sanity check failed: the converted model gives NaN/Inf logits"),
    "missing input": (lambda base, t: dict(base=t / "nowhere"), r"--input .*nowhere: no such model directory"),
    "width for concat": (lambda base, t: dict(strategy="concat_top2", extra=["--width-multiplier", "3"]),
                         r"--width-multiplier 3: concat_top2 builds a 2×-wide shared expert"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, base, stats, tmp_path, capsys):
    make, message = BAD[case]
    opts = dict(base=base, stats=stats, strategy="pca_top3", extra=[])
    opts.update(make(base, tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    out = work / "adapter"
    argv = ["convert", "--input", str(opts["base"]), "--output", str(out), "--init-strategy", opts["strategy"],
            *opts["extra"]]
    if opts["stats"] is not None:
        argv += ["--pca-stats", str(opts["stats"])]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and re.search(message, err), err
    assert list(work.iterdir()) == []  # no output dir, no temporary left behind


def test_existing_output_needs_overwrite(base, stats, tmp_path, capsys):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--input", str(base), "--output", str(out), "--pca-stats", str(stats),
              "--init-strategy", "pca_top2"])
    assert exc.value.code == 2 and "output directory exists (pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--input", str(base), "--output", str(out), "--pca-stats", str(stats),
              "--init-strategy", "pca_top2", "--overwrite", "--skip-check"])
    assert exc.value.code == 0
    assert sorted(p.name for p in out.iterdir()) == ["nexus_adapter.safetensors", "nexus_config.json"]


def test_default_init_is_random_and_needs_no_router_statistics(base, tmp_path):
    from nexus.convert.strategy import DEFAULT_INIT

    out = tmp_path / "adapter"
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--input", str(base), "--output", str(out), "--skip-check", "--seed", "5"])
    assert exc.value.code == 0 and DEFAULT_INIT == "random"
    config = json.loads((out / "nexus_config.json").read_text())
    assert config["init_strategy"] == "random"
    explicit = tmp_path / "explicit"
    with pytest.raises(SystemExit):
        main(["convert", "--input", str(base), "--output", str(explicit), "--skip-check", "--seed", "5",
              "--init-strategy", "random"])
    a, b = load_file(str(out / "nexus_adapter.safetensors")), load_file(str(explicit / "nexus_adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
