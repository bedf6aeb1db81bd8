"""Bad input against every verb: a clear error naming the file or flag, exit 2, no traceback, nothing written.

One table of (verb, case) -> (command line, expected message). Paths in the table are placeholders
filled from the `w` fixture: tiny models, datasets and artifacts made once per module by the real
verbs (collect, analyze, convert, precompute-teacher, train), plus damaged copies of them. Each case
runs in this process (`nexus.cli.main`) in an empty work directory that must still hold nothing
but what the case put there afterwards. Cases already tested in the stage test files are not
repeated here; docs/reliability.md lists both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from nexus.cli import main
from tiny import make_tokenizer, run_main, save_model_dir, write_text_dataset
from tiny import single_thread  # noqa: F401  (autouse: one thread, tiny models)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test loudly (tests run offline anyway)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _ok(*argv):
    r = run_main(*argv)
    assert r.returncode == 0, r.stderr[-3000:]


def _copy(src, dst):
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


class _RunsCode:
    """Pickles as a call of os.makedirs(path): what a malicious optimizer.pt could do on load."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Every input the table refers to, by placeholder name."""
    root = tmp_path_factory.mktemp("inputs")
    tok = make_tokenizer()
    p = {"root": root, "missing": root / "does-not-exist"}
    p["model"] = save_model_dir(root / "model", tokenizer=tok)
    p["other"] = save_model_dir(root / "other", tokenizer=tok, num_experts=4)  # same family, 4 experts
    p["othervocab"] = save_model_dir(root / "othervocab", vocab_size=80, tokenizer=make_tokenizer(80))

    from transformers import AutoModelForCausalLM, LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2))
    dense.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    p["dense"] = root / "dense"
    p["unsupported"] = root / "unsupported"  # a family transformers does not know, with custom code
    p["unsupported"].mkdir()
    (p["unsupported"] / "config.json").write_text(json.dumps({
        "model_type": "acme_moe", "architectures": ["AcmeMoeForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_acme.AcmeConfig",
                     "AutoModelForCausalLM": "modeling_acme.AcmeMoeForCausalLM"}}))
    (p["unsupported"] / "modeling_acme.py").write_text("raise SystemExit('remote code ran')\n")
    tok.save_pretrained(p["unsupported"])
    p["notmodel"] = root / "notmodel"
    p["notmodel"].mkdir()
    (p["notmodel"] / "notes.txt").write_text("not a model")
    p["model_trunc"] = _copy(p["model"], root / "model-trunc")
    _truncate(p["model_trunc"] / "model.safetensors")
    p["model_badconfig"] = _copy(p["model"], root / "model-badconfig")
    _truncate(p["model_badconfig"] / "config.json")

    p["data"] = write_text_dataset(root / "data.jsonl", n=24)
    p["empty"] = root / "empty.jsonl"
    p["empty"].write_text("\n\n")
    p["wrongfield"] = root / "wrongfield.jsonl"
    p["wrongfield"].write_text(json.dumps({"body": "the cat sat on the mat"}) + "\n")
    p["badjson"] = root / "badjson.jsonl"
    p["badjson"].write_text(json.dumps({"text": "the cat"}) + "\n{not json\n")
    p["tiny"] = root / "tiny.jsonl"
    p["tiny"].write_text(json.dumps({"text": "the"}) + "\n")
    p["unknownsuffix"] = root / "data.csv"
    p["unknownsuffix"].write_text("text\nthe cat\n")

    # Artifacts of the real stages, for this model and for `other` (4 experts).
    for name, model in (("stats", p["model"]), ("stats_other", p["other"])):
        p[name] = root / f"{name}.safetensors"
        _ok("collect", "--model", model, "--dataset", p["data"], "--output", p[name], "--seq-len", 32,
            "--target-tokens", 0, "--device", "cpu")
    for name, stats in (("pca", p["stats"]), ("pca_other", p["stats_other"])):
        p[name] = root / f"{name}.json"
        _ok("analyze", "--input", stats, "--output", p[name], "--no-plots", "--top-k", 2)
    p["adapter"] = root / "adapter"
    _ok("convert", "--input", p["model"], "--output", p["adapter"], "--pca-stats", p["pca"],
        "--init-strategy", "pca_top2")
    p["cache"] = root / "cache"
    _ok("precompute-teacher", "--model", p["model"], "--dataset", p["data"], "--output", p["cache"],
        "--seq-len", 16, "--num-sequences", 8, "--top-k", 4, "--device", "cpu")
    p["run"] = root / "run"
    _ok("train", "--student-model", p["adapter"], "--dataset", p["data"], "--output-dir", p["run"], "--seq-len", 16,
        "--max-steps", 2, "--checkpoint-interval", 1, "--device", "cpu")

    # Damaged or mismatched copies.
    from nexus.stats.accumulate import RouterStats

    stats = RouterStats.load(p["stats"])[0]
    stats.sums[0]["prob_sum"][1] = float("nan")
    p["stats_nan"] = stats.save(root / "stats-nan.safetensors")
    p["pca_trunc"] = _truncate(_copy(p["pca"], root / "pca-trunc.json"))
    p["adapter_trunc"] = _copy(p["adapter"], root / "adapter-trunc")
    _truncate(p["adapter_trunc"] / "nexus_adapter.safetensors")
    p["adapter_badconfig"] = _copy(p["adapter"], root / "adapter-badconfig")
    _truncate(p["adapter_badconfig"] / "nexus_config.json")
    p["adapter_otherbase"] = _copy(p["adapter"], root / "adapter-otherbase")  # its base replaced by another model
    cfg = json.loads((p["adapter"] / "nexus_config.json").read_text())
    (p["adapter_otherbase"] / "nexus_config.json").write_text(
        json.dumps(dict(cfg, base_model_name_or_path=str(p["other"]))))
    p["adapter_nan"] = _copy(p["adapter"], root / "adapter-nan")
    weights = load_file(str(p["adapter"] / "nexus_adapter.safetensors"))
    key = sorted(weights)[0]
    weights[key].view(-1)[3] = float("nan")
    save_file(weights, str(p["adapter_nan"] / "nexus_adapter.safetensors"), metadata={"format": "nexus-adapter"})
    p["nan_key"] = key
    p["cache_badmanifest"] = _copy(p["cache"], root / "cache-badmanifest")
    _truncate(p["cache_badmanifest"] / "manifest.json")
    p["cache_badshard"] = _copy(p["cache"], root / "cache-badshard")
    shard = p["cache_badshard"] / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the data: same size, wrong checksum
    shard.write_bytes(bytes(data))
    p["cache_seq"] = root / "cache-seq"  # the same model at another --seq-len
    _ok("precompute-teacher", "--model", p["model"], "--dataset", p["data"], "--output", p["cache_seq"],
        "--seq-len", 8, "--num-sequences", 8, "--top-k", 4, "--device", "cpu")
    ckpt = p["run"] / "checkpoint-1"
    for name, damage in (("ckpt_badstate", "trainer_state.json"), ("ckpt_badoptim", "optimizer.pt"),
                         ("ckpt_pickle", "optimizer.pt"), ("ckpt_truncadapter", "nexus_adapter.safetensors")):
        p[name] = _copy(ckpt, root / name / "checkpoint-1")
        if name == "ckpt_pickle":  # unpickled without weights_only, it would create root/pickle-ran
            torch.save({"state": {}, "param_groups": [], "payload": _RunsCode(root / "pickle-ran")}, p[name] / damage)
        elif name == "ckpt_badoptim":
            (p[name] / damage).write_bytes(b"garbage" * 20)
        else:
            _truncate(p[name] / damage)
    p["run_badconfig"] = _copy(p["run"], root / "run-badconfig")
    _truncate(p["run_badconfig"] / "run_config.json")
    p["yaml_bad"] = root / "bad.yaml"
    p["yaml_bad"].write_text("model: [unclosed\n")
    p["yaml_stage"] = root / "stage.yaml"
    p["yaml_stage"].write_text(f"model: {p['model']}\ndataset: {p['data']}\nstages:\n  distill: {{}}\n")
    p["yaml_option"] = root / "option.yaml"
    p["yaml_option"].write_text(f"model: {p['model']}\ndataset: {p['data']}\nwork_dir: {root / 'pipe'}\n"
                                f"stages:\n  sample:\n    target_tokens: lots\n")
    return p


# verb -> base command line ({out} is where the verb writes; it must not appear).
BASE = {
    "plan": ["plan", "--model", "{model}"],
    "sample": ["sample", "--dataset", "{data}", "--tokenizer", "{model}", "--output", "{out}"],
    "collect": ["collect", "--model", "{model}", "--dataset", "{data}", "--output", "{out}", "--seq-len", "16",
                "--target-tokens", "0", "--device", "cpu"],
    "analyze": ["analyze", "--input", "{stats}", "--output", "{out}", "--no-plots"],
    "convert": ["convert", "--input", "{model}", "--output", "{out}", "--pca-stats", "{pca}",
                "--init-strategy", "pca_top2"],
    "precompute-teacher": ["precompute-teacher", "--model", "{model}", "--dataset", "{data}", "--output", "{out}",
                           "--seq-len", "16", "--num-sequences", "4", "--top-k", "4", "--device", "cpu"],
    "train": ["train", "--student-model", "{adapter}", "--dataset", "{data}", "--output-dir", "{out}",
              "--seq-len", "16", "--max-steps", "2", "--device", "cpu"],
    "validate": ["validate", "--model", "{adapter}", "--dataset", "{data}", "--output", "{out}", "--seq-len", "16",
                 "--num-samples", "2", "--device", "cpu"],
    "chat": ["chat", "--model", "{adapter}", "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"],
    "plot-metrics": ["plot-metrics", "{run}", "--output", "{out}"],
    "pipeline": ["pipeline", "{yaml_bad}"],
}
NOT_A_MODEL = r"no config\.json"
NO_MOE = r"dense: model type 'llama' has no MoE layers .*Supported families: gpt_oss"
ACME = r"acme_moe"

# (verb, case): (flag -> replacement value, or None to drop the flag; extra args), expected message.
# A flag that takes no value is added through `extra`.
CASES = {
    # plan: reads config.json only
    ("plan", "missing path"): ({"--model": "{missing}"}, r"--model .*does-not-exist: no such"),
    ("plan", "not a model"): ({"--model": "{notmodel}"}, NOT_A_MODEL),
    ("plan", "unsupported family"): ({"--model": "{unsupported}"}, r"--model .*unsupported: model_type "
                                                                    r"'acme_moe' is not a model family"),
    ("plan", "truncated config.json"): ({"--model": "{model_badconfig}"}, r"config\.json is not valid JSON"),
    ("plan", "width multiplier 0"): ({}, r"--width-multiplier must be a positive number, got 0", ["--width-multiplier", "0"]),
    ("plan", "devices 0"): ({}, r"--devices 0: expected a number of devices >= 1", ["--devices", "0"]),
    ("plan", "device memory 0"): ({}, r"--device-memory 0\.0: expected GiB per device > 0", ["--device-memory", "0"]),
    # sample
    ("sample", "missing dataset"): ({"--dataset": "{missing}"}, r"--dataset .*does-not-exist: no such file"),
    ("sample", "missing tokenizer"): ({"--tokenizer": "{missing}"}, r"--tokenizer .*does-not-exist: no such"),
    ("sample", "not a tokenizer"): ({"--tokenizer": "{notmodel}"}, r"--tokenizer .*notmodel: no tokenizer files there"),
    ("sample", "unsupported file type"): ({"--dataset": "{unknownsuffix}"}, r"unsupported file type '\.csv'"),
    ("sample", "bad JSON line"): ({"--dataset": "{badjson}"}, r"badjson\.jsonl: line 2 is not valid JSON"),
    ("sample", "seq-len 0"): ({}, r"--seq-len must be at least 1, got 0", ["--seq-len", "0"]),
    ("sample", "existing output"): ({}, r"--output .*out exists \(pass --overwrite"),
    # collect
    ("collect", "missing model"): ({"--model": "{missing}"}, r"--model .*does-not-exist: no such directory"),
    ("collect", "not a model"): ({"--model": "{notmodel}"}, NOT_A_MODEL),
    ("collect", "dense model"): ({"--model": "{dense}"}, NO_MOE),
    ("collect", "unsupported family"): ({"--model": "{unsupported}"}, ACME),
    ("collect", "truncated weights"): ({"--model": "{model_trunc}"}, r"--model .*model-trunc: cannot load"),
    ("collect", "truncated config.json"): ({"--model": "{model_badconfig}"},
                                           r"--model .*model-badconfig: config\.json is not valid JSON"),
    ("collect", "wrong field"): ({"--dataset": "{wrongfield}"}, r"has no field 'text'"),
    ("collect", "bad JSON line"): ({"--dataset": "{badjson}"}, r"line 2 is not valid JSON"),
    ("collect", "negative batch size"): ({}, r"--batch-size must be at least 1, got -1", ["--batch-size", "-1"]),
    ("collect", "negative target tokens"): ({"--target-tokens": "-5"}, r"--target-tokens must be at least 0"),
    ("collect", "seq-len above the model's"): ({"--seq-len": "1000"}, r"--seq-len 1000 is above .*= 128"),
    ("collect", "not a device"): ({"--device": "tpu9"}, r"--device tpu9: not a device"),
    ("collect", "existing output"): ({}, r"--output .*out\.safetensors exists \(pass --overwrite"),
    ("collect", "merge a missing file"): ({"--model": None, "--dataset": None}, r"does-not-exist: no such router",
                                          ["--merge", "{stats}", "{missing}"]),
    ("collect", "merge statistics of two models"): ({"--model": None, "--dataset": None},
                                                    r"num_experts differs \(8 vs 4\)",
                                                    ["--merge", "{stats}", "{stats_other}"]),
    ("collect", "corrupt partial on resume"): ({}, r"out\.partial\.safetensors: not a readable safetensors",
                                               ["--resume"]),
    # analyze
    ("analyze", "missing input"): ({"--input": "{missing}"}, r"does-not-exist: no such router statistics file"),
    ("analyze", "pca_stats instead of statistics"): ({"--input": "{pca}"}, r"pca\.json: not a readable safetensors"),
    ("analyze", "statistics of another model"): ({"--input": "{stats_other}"},
                                                 r"statistics have 4 experts per layer, but --model",
                                                 ["--model", "{model}"]),
    ("analyze", "--model missing"): ({}, r"--model .*does-not-exist: no such", ["--model", "{missing}"]),
    ("analyze", "top-k above the expert count"): ({}, r"--top-k 9 .*8 experts", ["--top-k", "9"]),
    ("analyze", "auto-share above 1"): ({}, r"--auto-share must be in \(0, 1\], got 1\.5",
                                        ["--auto-share", "1.5"]),
    ("analyze", "NaN in the statistics"): ({"--input": "{stats_nan}"}, r"stats-nan\.safetensors: tensor "
                                           r"layers\.0\.prob_sum holds NaN or infinite values"),
    ("analyze", "n-components 0"): ({}, r"--n-components must be at least 1", ["--n-components", "0"]),
    ("analyze", "existing output"): ({}, r"--output .*out exists \(pass --overwrite"),
    # convert (missing input, shards, NaN experts, stats contents: tests/test_convert_cli.py)
    ("convert", "not a model"): ({"--input": "{notmodel}"}, r"--input .*notmodel: no config\.json"),
    ("convert", "dense model"): ({"--input": "{dense}"}, NO_MOE),
    ("convert", "unsupported family"): ({"--input": "{unsupported}"}, ACME),
    ("convert", "truncated config.json"): ({"--input": "{model_badconfig}"},
                                           r"--input .*model-badconfig: config\.json is not valid JSON"),
    ("convert", "truncated weights"): ({"--input": "{model_trunc}"}, r"model\.safetensors: truncated or corrupted"),
    ("convert", "pca_stats of another model"): ({"--pca-stats": "{pca_other}"},
                                                r"made for 4 experts per layer, the model has 8"),
    ("convert", "truncated pca_stats"): ({"--pca-stats": "{pca_trunc}"}, r"pca-trunc\.json: not valid JSON"),
    ("convert", "statistics instead of pca_stats"): (
        {"--pca-stats": "{stats}"}, r"stats\.safetensors: a safetensors file \(router statistics from `nexus "
                                    r"collect`\?\), not a pca_stats\.json; make one with: nexus analyze --input "),
    ("convert", "missing pca_stats"): ({"--pca-stats": "{missing}"}, r"does-not-exist: no such pca_stats\.json"),
    ("convert", "scale nan"): ({}, r"--scale must be a finite number", ["--scale", "nan"]),
    ("convert", "negative width"): ({}, r"--width-multiplier must be a positive number", ["--width-multiplier", "-1"]),
    # precompute-teacher (refused disk room, other settings: tests/test_teacher_cache.py)
    ("precompute-teacher", "missing model"): ({"--model": "{missing}"}, r"--model .*does-not-exist: no such"),
    ("precompute-teacher", "not a model"): ({"--model": "{notmodel}"}, NOT_A_MODEL),
    ("precompute-teacher", "unsupported family"): ({"--model": "{unsupported}"}, ACME),
    ("precompute-teacher", "truncated weights"): ({"--model": "{model_trunc}"}, r"model-trunc: cannot load"),
    ("precompute-teacher", "adapter on another base"): ({"--model": "{adapter_otherbase}"},
                                                        r"made for 8 experts per layer, the base has 4"),
    ("precompute-teacher", "empty dataset"): ({"--dataset": "{empty}"}, r"no non-empty documents"),
    ("precompute-teacher", "wrong field"): ({"--dataset": "{wrongfield}"}, r"has no field 'text'"),
    ("precompute-teacher", "tiny dataset"): ({"--dataset": "{tiny}"}, r"make no sequence of --seq-len 16"),
    ("precompute-teacher", "negative steps"): ({"--num-sequences": None}, r"--num-sequences / --num-steps must be at "
                                               r"least 1, got -2", ["--num-steps", "-2"]),
    ("precompute-teacher", "top-k above the vocabulary"): ({"--top-k": "1000"}, r"--top-k 1000 is above the vocab"),
    ("precompute-teacher", "router top-k above the experts"): ({}, r"--router-topk 9 is above the 8 experts",
                                                               ["--router-topk", "9"]),
    ("precompute-teacher", "seq-len above the data"): ({"--seq-len": "1000"}, r"make no sequence of --seq-len 1000"),
    ("precompute-teacher", "existing non-cache output"): ({}, r"--output .*out: exists and is not a teacher cache"),
    ("precompute-teacher", "output is a file"): ({"--output": "{data}"}, r"--output .*data\.jsonl: .*not a teacher "
                                                 r"cache"),
    # train (existing run, bad schedule flags, other vocabulary, seq-len, caches: tests/test_train_recipe.py,
    # tests/test_train_schedule.py, tests/test_teacher_cache.py)
    ("train", "missing student"): ({"--student-model": "{missing}"}, r"--student-model .*does-not-exist: no such"),
    ("train", "not a model"): ({"--student-model": "{notmodel}"}, NOT_A_MODEL),
    ("train", "dense model"): ({"--student-model": "{dense}"}, NO_MOE, ["--init-strategy", "random"]),
    ("train", "unsupported family"): ({"--student-model": "{unsupported}"}, ACME, ["--init-strategy", "random"]),
    ("train", "truncated base weights"): ({"--student-model": "{model_trunc}"}, r"model-trunc: cannot load",
                                          ["--init-strategy", "random"]),
    ("train", "adapter on another base"): ({"--student-model": "{adapter_otherbase}"},
                                           r"made for 8 experts per layer, the base has 4"),
    ("train", "truncated adapter weights"): ({"--student-model": "{adapter_trunc}"},
                                             r"adapter-trunc/nexus_adapter\.safetensors: not a readable safetensors"),
    ("train", "truncated adapter config"): ({"--student-model": "{adapter_badconfig}"},
                                            r"adapter-badconfig/nexus_config\.json: not valid JSON"),
    ("train", "NaN in the adapter"): ({"--student-model": "{adapter_nan}"},
                                      r"adapter-nan/nexus_adapter\.safetensors: '{nan_key}' holds NaN or infinite"),
    ("train", "missing teacher"): ({}, r"--teacher-model .*does-not-exist: no such", ["--teacher-model", "{missing}"]),
    ("train", "missing eval dataset"): ({}, r"--eval-dataset .*does-not-exist: no such file",
                                        ["--eval-dataset", "{missing}"]),
    ("train", "wrong field"): ({"--dataset": "{wrongfield}"}, r"has no field 'text'"),
    ("train", "bad JSON line"): ({"--dataset": "{badjson}"}, r"line 2 is not valid JSON"),
    ("train", "tiny dataset"): ({"--dataset": "{tiny}"}, r"make no sequence of --seq-len 16"),
    ("train", "negative steps"): ({"--max-steps": "-3"}, r"--max-steps must be at least 1, got -3"),
    ("train", "steps not a number"): ({"--max-steps": "ten"}, r"argument --max-steps: invalid int value: 'ten'"),
    ("train", "bias-freeze-ratio above 1"): ({}, r"--bias-freeze-ratio must be in \[0, 1\], got 1\.5",
                                             ["--bias-freeze-ratio", "1.5"]),
    ("train", "sfa-alpha 1"): ({}, r"--sfa-alpha must be in \(0, 1\)", ["--sfa-alpha", "1"]),
    ("train", "learning rate nan"): ({}, r"--learning-rate must be positive, got nan", ["--learning-rate", "nan"]),
    ("train", "cache at another seq-len"): ({}, r"made with --seq-len 8, this run uses --seq-len 16",
                                            ["--precomputed-teacher", "{cache_seq}"]),
    ("train", "missing cache"): ({}, r"--precomputed-teacher .*does-not-exist: no such directory",
                                 ["--precomputed-teacher", "{missing}"]),
    ("train", "truncated cache manifest"): ({}, r"cache-badmanifest/manifest\.json: not valid JSON",
                                            ["--precomputed-teacher", "{cache_badmanifest}"]),
    ("train", "corrupted cache shard"): ({}, r"shard-00000\.safetensors: checksum mismatch",
                                         ["--precomputed-teacher", "{cache_badshard}"]),
    ("train", "resume from nothing"): ({}, r"--resume-from-checkpoint .*does-not-exist: not a training checkpoint",
                                       ["--resume-from-checkpoint", "{missing}"]),
    ("train", "resume from final"): ({}, r"only checkpoint-N directories can be resumed",
                                     ["--resume-from-checkpoint", "{run}/final"]),
    ("train", "resume, truncated state"): ({}, r"trainer_state\.json: not valid JSON",
                                           ["--resume-from-checkpoint", "{ckpt_badstate}"]),
    ("train", "resume, garbage optimizer"): ({}, r"optimizer\.pt: not a NEXUS optimizer state",
                                             ["--resume-from-checkpoint", "{ckpt_badoptim}"]),
    ("train", "resume, pickle with code"): ({}, r"optimizer\.pt: not a NEXUS optimizer state",
                                            ["--resume-from-checkpoint", "{ckpt_pickle}"]),
    ("train", "resume, truncated adapter"): ({}, r"nexus_adapter\.safetensors: not a readable safetensors",
                                             ["--resume-from-checkpoint", "{ckpt_truncadapter}"]),
    ("train", "resume another run's checkpoint"): ({}, r"checkpoint-1: the training data or --seed differ",
                                                   ["--resume-from-checkpoint", "{run}/checkpoint-1", "--seed", "5"]),
    ("train", "output is a file"): ({"--output-dir": "{data}"}, r"--output-dir .*data\.jsonl: .*not a directory"),
    # validate (a plain model without --baseline, existing output, missing dataset: tests/test_validate.py)
    ("validate", "missing model"): ({"--model": "{missing}"}, r"--model .*does-not-exist: no such directory"),
    ("validate", "not a model"): ({"--model": "{notmodel}"}, NOT_A_MODEL),
    ("validate", "unsupported family"): ({"--model": "{unsupported}"}, ACME, ["--baseline", "{model}"]),
    ("validate", "adapter on another base"): ({"--model": "{adapter_otherbase}"},
                                              r"made for 8 experts per layer, the base has 4"),
    ("validate", "truncated adapter weights"): ({"--model": "{adapter_trunc}"}, r"not a readable safetensors"),
    ("validate", "truncated adapter config"): ({"--model": "{adapter_badconfig}"}, r"nexus_config\.json: not valid"),
    ("validate", "NaN in the adapter"): ({"--model": "{adapter_nan}"}, r"holds NaN or infinite"),
    ("validate", "baseline with another tokenizer"): ({}, r"--baseline .*othervocab: its tokenizer differs",
                                                      ["--baseline", "{othervocab}"]),
    ("validate", "missing baseline"): ({}, r"--baseline .*does-not-exist: no such", ["--baseline", "{missing}"]),
    ("validate", "empty dataset"): ({"--dataset": "{empty}"}, r"--dataset .*empty\.jsonl: no non-empty documents"),
    ("validate", "wrong field"): ({"--dataset": "{wrongfield}"}, r"has no field 'text'"),
    ("validate", "num-samples 0"): ({"--num-samples": "0"}, r"--num-samples must be >= 1, got 0"),
    ("validate", "seq-len above the model's"): ({"--seq-len": "1000"}, r"--seq-len 1000 is above"),
    ("validate", "not a device"): ({}, r"--device tpu9: not a device", ["--device", "tpu9"]),
    ("validate", "unknown dtype"): ({}, r"argument --dtype: must be one of .*, got 'fp8'", ["--dtype", "fp8"]),
    # chat (missing and empty directories: tests/test_chat.py)
    ("chat", "unsupported family"): ({"--model": "{unsupported}"}, ACME),
    ("chat", "truncated adapter weights"): ({"--model": "{adapter_trunc}"}, r"not a readable safetensors"),
    ("chat", "adapter on another base"): ({"--model": "{adapter_otherbase}"}, r"made for 8 experts per layer"),
    ("chat", "top-p above 1"): ({}, r"--top-p must be in \(0, 1\], got 1\.5", ["--top-p", "1.5"]),
    ("chat", "negative temperature"): ({}, r"--temperature must be >= 0", ["--temperature", "-1"]),
    ("chat", "max-new-tokens 0"): ({"--max-new-tokens": "0"}, r"--max-new-tokens must be >= 1"),
    # plot-metrics
    ("plot-metrics", "missing run"): ({"{run}": "{missing}"}, r"does-not-exist: no metrics\.jsonl"),
    ("plot-metrics", "not a run"): ({"{run}": "{notmodel}"}, r"notmodel: no metrics\.jsonl"),
    ("plot-metrics", "truncated run_config.json"): ({"{run}": "{run_badconfig}"}, r"run_config\.json: not valid JSON"),
    # pipeline
    ("pipeline", "missing config"): ({"{yaml_bad}": "{missing}"}, r"does-not-exist: no such pipeline config"),
    ("pipeline", "invalid YAML"): ({}, r"bad\.yaml: not valid YAML"),
    ("pipeline", "unknown stage"): ({"{yaml_bad}": "{yaml_stage}"}, r"unknown stage 'distill'"),
    ("pipeline", "invalid stage option"): ({"{yaml_bad}": "{yaml_option}"},
                                           r"option\.yaml: stage 'sample': argument --target-tokens: invalid int "
                                           r"value: 'lots'"),
}


def _argv(verb: str, changes: dict, extra: list[str]) -> list[str]:
    argv = list(BASE[verb])
    for flag, value in changes.items():
        i = argv.index(flag)
        if flag.startswith("{"):  # a positional placeholder
            argv[i] = value
        elif value is None:
            del argv[i:i + 2]
        else:
            argv[i + 1] = value
    return argv + list(extra)


def _setup(verb: str, case: str, out):
    """What a case puts in the work directory before the run (kept byte for byte)."""
    if case == "existing output":
        out.write_text("keep")
    elif case == "existing non-cache output":
        out.mkdir()
        (out / "keep.txt").write_text("keep")
    elif case == "corrupt partial on resume":
        (out.parent / "out.partial.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")


def _snapshot(directory):
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None) for p in directory.rglob("*")}


@pytest.mark.parametrize("verb,case", list(CASES), ids=[f"{v}: {c}" for v, c in CASES])
def test_bad_input_is_a_clear_error(verb, case, w, tmp_path, capsys):
    changes, expected, *extra = CASES[(verb, case)]
    work = tmp_path / "work"
    work.mkdir()
    out = work / ("out.safetensors" if verb == "collect" else "out")
    paths = dict(w, out=out)
    argv = [re.sub(r"\{(\w+)\}", lambda m: str(paths[m.group(1)]), a) for a in _argv(verb, changes, *extra or [[]])]
    _setup(verb, case, out)
    before = _snapshot(work)
    inputs = _snapshot(w["root"])

    code, _, err = _cli(argv, capsys)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    expected = re.sub(r"\{(\w+)\}", lambda m: re.escape(str(paths[m.group(1)])), expected)
    # our own errors, or argparse's for values of the wrong type ("nexus VERB: error: argument ...")
    assert code == 2 and re.match(rf"(nexus {verb}: )?error: ", last) and re.search(expected, last), \
        (code, err[-2000:])
    assert "Traceback" not in err
    assert _snapshot(work) == before, "the failed run left something in the work directory"
    assert _snapshot(w["root"]) == inputs, "the failed run changed an input"

