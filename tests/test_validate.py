"""nexus validate: metrics checked against independent computations, the report files, the verb."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import nexus
from conftest import VOCAB, tiny_model
from nexus import cli
from nexus.data import pad_batch
from nexus.errors import NexusError
from nexus.moe import find_moe_blocks
from nexus.validate import evaluate, kl_divergence, nll, perplexity, routing_agreement
from nexus.validate.report import ACCEPTABLE, EXCELLENT, FAIL, IMPROVED, overall_verdict, render_markdown, verdict
from tiny import SPECIALS, run_cli, save_adapter_dir, save_model_dir, write_datasets, write_jsonl

FIRST_WORD_ID = len(SPECIALS)  # ids below are special tokens of the tiny tokenizer


def _seqs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(FIRST_WORD_ID, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _padded(seqs, garbage_seed=1):
    """Right-padded batch whose padding holds random real-looking ids (so it must be masked to not count)."""
    ids, mask = pad_batch(seqs, pad_id=0)
    g = torch.Generator().manual_seed(garbage_seed)
    noise = torch.randint(FIRST_WORD_ID, VOCAB, ids.shape, generator=g)
    return torch.where(mask.bool(), ids, noise), mask


def _reference_nll(model, seq) -> tuple[float, int]:
    """NLL sum of one unpadded sequence, computed in float64 position by position."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].double()  # (L, V)
    logp = torch.log_softmax(logits, -1)
    return -sum(float(logp[t, seq[t + 1]]) for t in range(len(seq) - 1)), len(seq) - 1


def test_perplexity_equals_transformers_loss():
    model = tiny_model("qwen3_moe")  # no aux loss unless output_router_logits: labels loss is plain CE
    ids = torch.tensor(_seqs([24])[0]).unsqueeze(0)
    with torch.no_grad():
        out = model(ids, labels=ids)
    s, n = nll(out.logits, ids)
    assert n == 23
    assert perplexity(s, n) == pytest.approx(math.exp(out.loss.item()), rel=1e-6)


def test_padding_excluded():
    model = tiny_model("mixtral")
    seqs = _seqs([20, 11, 3])
    ids, mask = _padded(seqs)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    s, n = nll(logits, ids, mask)
    ref = [_reference_nll(model, q) for q in seqs]
    assert n == sum(c for _, c in ref) == 19 + 10 + 2
    assert perplexity(s, n) == pytest.approx(math.exp(sum(x for x, _ in ref) / n), rel=1e-5)


def test_evaluate_matches_independent_computation():
    """Model and baseline perplexities from `evaluate` on padded batches = unpadded recomputation."""
    model = nexus.attach_shared_experts(tiny_model("qwen3_moe"), init="random", seed=0, scale=20.0)
    base = tiny_model("qwen3_moe")
    seqs = _seqs([16, 9, 12, 5], seed=3)
    batches = [_padded(seqs[:2]), _padded(seqs[2:])]
    totals = evaluate(model, batches)
    s = totals.summary()
    ref_model = [_reference_nll(model, q) for q in seqs]
    ref_base = [_reference_nll(base, q) for q in seqs]
    n = sum(c for _, c in ref_model)
    assert s["tokens"] == n
    assert s["perplexity"] == pytest.approx(math.exp(sum(x for x, _ in ref_model) / n), rel=1e-5)
    assert s["baseline_perplexity"] == pytest.approx(math.exp(sum(x for x, _ in ref_base) / n), rel=1e-5)
    assert s["degradation_pct"] == pytest.approx((s["perplexity"] / s["baseline_perplexity"] - 1) * 100)
    assert s["kl"] > 0


def test_zero_adapter_reports_no_change():
    model = nexus.attach_shared_experts(tiny_model("gpt_oss"), init="zero")
    seqs = _seqs([14, 6, 10])
    totals = evaluate(model, [_padded(seqs[:2]), _padded(seqs[2:])])
    s = totals.summary()
    assert s["degradation_pct"] == 0.0
    assert abs(s["kl"]) < 1e-9
    for m in totals.layer_summary().values():
        assert m["routing_agreement"] == 1.0
        assert m["router_entropy"] == pytest.approx(m["baseline_router_entropy"], abs=1e-9)
        assert m["shared_output_ratio"] == 0.0


def test_separate_baseline_equals_shared_experts_off():
    model = nexus.attach_shared_experts(tiny_model("olmoe"), init="random", seed=1, scale=20.0)
    batches = [_padded(_seqs([12, 7], seed=5))]
    same = evaluate(model, batches)
    separate = evaluate(model, batches, baseline=tiny_model("olmoe"))
    for key, value in same.summary().items():
        assert separate.summary()[key] == pytest.approx(value, rel=1e-6)
    for layer, metrics in same.layer_summary().items():
        assert separate.layer_summary()[layer] == pytest.approx(metrics, rel=1e-6)
    assert same.layer_summary()["1"]["shared_output_ratio"] > 0


def test_a_baseline_with_other_experts_says_so_and_has_no_agreement(caplog):
    model = nexus.attach_shared_experts(tiny_model("olmoe"), init="random", seed=1)
    with caplog.at_level("WARNING", logger="nexus.validate"):
        totals = evaluate(model, [_padded(_seqs([12, 7]))] * 2, baseline=tiny_model("olmoe", num_experts=4))
    assert caplog.text.count("no routing agreement") == 2  # once per layer, not per batch
    assert "layer 0: the model routes over 8 experts, the baseline over 4" in caplog.text
    for m in totals.layer_summary().values():
        assert m["routing_agreement"] is None and m["router_entropy"] > 0


def test_real_tokens_refuses_a_token_count_that_is_not_the_batch():
    from nexus.validate.metrics import real_tokens

    x = torch.arange(6.0).reshape(3, 2)  # (T, H)
    assert real_tokens(x, torch.tensor([True, False, True]), 0, "x").tolist() == [[0.0, 1.0], [4.0, 5.0]]
    with pytest.raises(NexusError, match="layer 3: the MoE block output has 3 token rows but the batch has 4"):
        real_tokens(x, torch.ones(4, dtype=torch.bool), 3, "MoE block output")


@pytest.mark.parametrize("family", ["gpt_oss", "qwen2_moe", "deepseek_v3", "mixtral"])
def test_layer_metrics_every_family(family):
    model = nexus.attach_shared_experts(tiny_model(family), init="random", seed=0, scale=50.0)
    totals = evaluate(model, [_padded(_seqs([10, 6]))], compute_perplexity=False)
    layers = totals.layer_summary()
    assert list(layers) == [str(b.layer) for b in find_moe_blocks(model)]
    for m in layers.values():
        assert 0.0 <= m["routing_agreement"] <= 1.0
        assert 0.0 < m["router_entropy"] <= math.log(8) + 1e-6
        assert m["shared_output_ratio"] > 0
    s = totals.summary()
    assert s["perplexity"] is None and s["tokens"] == 9 + 5 and s["kl"] > 0


@pytest.mark.parametrize("chunk", [1, 5, 10_000])
def test_evaluate_applies_the_heads_a_chunk_of_positions_at_a_time(monkeypatch, chunk):
    """No (B, L, V) logits: each LM head call sees at most `chunk` real positions, padding never, and the
    figures equal the definitions on the model's own full logits (kl_divergence, nll) at any chunk size."""
    from nexus.validate import metrics

    model = nexus.attach_shared_experts(tiny_model("mixtral"), init="random", seed=2, scale=20.0)
    base = tiny_model("mixtral")
    ids, mask = _padded(_seqs([16, 9, 12, 5], seed=4))
    with torch.no_grad():
        logits, base_logits = model(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits
    rows, checked = [], []
    for m in (model, base):
        m.get_output_embeddings().register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1].numel()))
    monkeypatch.setattr(metrics, "check_head_split", lambda m, device, root: checked.append(m))
    monkeypatch.setattr(metrics, "default_chunk_size", lambda vocab: chunk)
    s = evaluate(model, [(ids, mask)], baseline=base, temperature=2.0).summary()
    assert checked == [model, base] and max(rows) <= chunk and sum(rows) == 2 * int(mask.sum())
    kl, positions = kl_divergence(base_logits, logits, mask, temperature=2.0)
    (model_nll, n), (base_nll, _) = nll(logits, ids, mask), nll(base_logits, ids, mask)
    assert s["tokens"] == n == 15 + 8 + 11 + 4
    # a small difference of nearly equal distributions: fp32 products of a 1-row and a 64-row GEMM differ in
    # their last bits, which its relative value magnifies
    assert s["kl"] == pytest.approx(kl / positions, rel=1e-3) and s["kl"] > 1e-4
    assert s["perplexity"] == pytest.approx(perplexity(model_nll, n), rel=1e-6)
    assert s["baseline_perplexity"] == pytest.approx(perplexity(base_nll, n), rel=1e-6)


def test_logits_that_are_not_the_head_of_the_hidden_states_are_refused_overflow_is_not(monkeypatch):
    """evaluate applies the LM head itself, so a family that post-processes its logits (softcapping,
    scaling) is refused by name; a head that overflows passes this check (the report then says so)."""
    from nexus.forward import check_head_split

    model = nexus.attach_shared_experts(tiny_model("qwen3_moe"), init="random", seed=0, scale=20.0)
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5  # as a family with a logit scale would
        return out

    monkeypatch.setattr(model, "forward", scaled)
    with pytest.raises(NexusError, match="logits are not lm_head"):
        evaluate(model, [_padded(_seqs([6]))])
    monkeypatch.undo()
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("inf")
    check_head_split(model, torch.device("cpu"))


def test_evaluate_needs_a_baseline_for_a_plain_model():
    with pytest.raises(nexus.errors.NexusError, match="baseline"):
        evaluate(tiny_model("mixtral"), [_padded(_seqs([5]))])


def test_kl_known_values_and_mask():
    teacher = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))  # (1, 2, 2)
    student = torch.log(torch.tensor([[[0.25, 0.75], [0.1, 0.9]]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    total, count = kl_divergence(teacher, student, torch.tensor([[1, 0]]))
    assert count == 1 and total == pytest.approx(expected, rel=1e-6)
    t = 2.0
    total, count = kl_divergence(teacher, student, temperature=t)
    p, q = torch.softmax(teacher / t, -1), torch.softmax(student / t, -1)
    assert total == pytest.approx(float((p * (p.log() - q.log())).sum()) * t * t, rel=1e-5) and count == 2
    masked = teacher.clone()
    masked[0, 0, 1] = -math.inf  # a vocabulary entry the teacher never predicts contributes 0, not NaN
    assert math.isfinite(kl_divergence(masked, student)[0])


def test_routing_agreement_counts_overlap_not_order():
    a = torch.tensor([[0, 1], [2, 3], [4, 5]])
    b = torch.tensor([[1, 0], [2, 6], [7, 6]])
    assert routing_agreement(a, b).tolist() == [1.0, 0.5, 0.0]


def test_verdict_thresholds():
    assert verdict(-3.0) == IMPROVED and verdict(0.0) == EXCELLENT and verdict(4.99) == EXCELLENT
    assert verdict(5.0) == ACCEPTABLE and verdict(10.0) == ACCEPTABLE
    assert verdict(10.01) == FAIL
    assert verdict(2.0, excellent_below=1.0, fail_above=1.5) == FAIL
    assert verdict(None) is None


# --- the verb ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    base = save_model_dir(root / "base")
    return {"root": root, "base": base, "zero": save_adapter_dir(base, root / "zero"),
            "random": save_adapter_dir(base, root / "random", init="random", scale=300.0),
            **write_datasets(root / "data")}


def test_dataset_names_and_sequences(dirs, tmp_path):
    from transformers import AutoTokenizer

    from nexus.validate.cli import parse_datasets
    from nexus.validate.core import sequences

    assert parse_datasets(["a=x.txt", "y/z.jsonl"]) == {"a": "x.txt", "z": "y/z.jsonl"}
    with pytest.raises(nexus.errors.NexusError, match="twice"):
        parse_datasets(["x.txt", "x=other.txt"])
    tok = AutoTokenizer.from_pretrained(dirs["base"])
    texts = [json.loads(line)["text"] for line in dirs["domain"].read_text().splitlines()]
    docs = [len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]  # + EOS
    unpacked = sequences(str(dirs["domain"]), tok, 8, 100)
    assert [len(s) for s in unpacked] == [n for d in docs for n in [8] * (d // 8) + [d % 8] if n >= 2]
    assert len(sequences(str(dirs["domain"]), tok, 8, 3)) == 3
    packed = sequences(str(dirs["domain"]), tok, 8, 100, packed=True)
    assert [len(s) for s in packed] == [8] * (sum(docs) // 8)
    with pytest.raises(nexus.errors.NexusError, match="too short"):
        sequences(str(dirs["domain"]), tok, 1000, 5, packed=True)


def _main(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    return exc.value.code, capsys.readouterr()


def test_cli_writes_report(dirs):
    out = dirs["root"] / "report_zero"
    r = run_cli("validate", "--model", dirs["zero"], "--dataset", f"general={dirs['general']}",
                  "--dataset", dirs["domain"], "--compute-perplexity", "--num-samples", 6, "--seq-len", 16,
                  "--batch-size", 4, "--output", out, "--fail-on-degradation")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["format", "version", "model", "baseline", "datasets", "layers"]
    assert report["format"] == "nexus-validation" and report["version"] == 1
    assert report["baseline"] == str(dirs["base"].resolve())
    assert list(report["datasets"]) == ["general", "domain"]
    for d in report["datasets"].values():
        assert list(d) == ["tokens", "perplexity", "baseline_perplexity", "degradation_pct", "kl"]
        assert d["tokens"] > 0 and d["degradation_pct"] == 0.0 and abs(d["kl"]) < 1e-9
    assert list(report["layers"]) == ["0", "1"]
    for m in report["layers"].values():
        assert list(m) == ["router_entropy", "baseline_router_entropy", "routing_agreement", "shared_output_ratio"]
        assert m["routing_agreement"] == 1.0 and m["shared_output_ratio"] == 0.0
    md = (out / "report.md").read_text()
    assert "**excellent retention**" in md and "| general |" in md and "| domain |" in md
    for name in ("router_entropy", "routing_agreement", "shared_output_ratio", "perplexity"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    assert "verdict: excellent retention" in r.stdout
    assert not [p for p in dirs["root"].iterdir() if p.name.startswith(".")]  # no temporary dirs left


def test_fail_on_degradation_thresholds_and_single_load(dirs, capsys, monkeypatch):
    from nexus.validate import cli as vcli
    from nexus.validate import core as vcore

    loads = []
    real = vcli.load_for_inference
    for module in (vcli, vcore):  # the model (cli) and a separate baseline (core)
        monkeypatch.setattr(module, "load_for_inference", lambda path, args, what="--model": loads.append(path) or
                            real(path, args, what))
    out = dirs["root"] / "report_random"
    args = ["validate", "--model", str(dirs["random"]), "--dataset", str(dirs["general"]), "--compute-perplexity",
            "--num-samples", "3", "--seq-len", "16", "--output", str(out), "--baseline", str(dirs["base"])]
    code, cap = _main(args, capsys)
    assert code == 0, cap.err
    assert len(loads) == 1  # --baseline is the adapter's own base: no second model
    report = json.loads((out / "report.json").read_text())
    d = report["datasets"]["general"]["degradation_pct"]
    assert d != 0.0 and report["datasets"]["general"]["kl"] > 0
    strict = ["--overwrite", "--excellent-threshold", str(d - 2), "--fail-threshold", str(d - 1)]
    code, cap = _main(args + strict + ["--fail-on-degradation"], capsys)
    assert code == 1 and "verdict: fail" in cap.out
    assert "**fail**" in (out / "report.md").read_text()
    code, cap = _main(args + strict, capsys)  # the verdict alone does not change the exit code
    assert code == 0
    code, cap = _main(args + ["--overwrite", "--fail-on-degradation"], capsys)
    assert code == 0 and "verdict: excellent retention" in cap.out
    # a different baseline directory is loaded separately and gives the same figures
    other = dirs["root"] / "base_copy"
    shutil.copytree(dirs["base"], other)
    loads.clear()
    code, cap = _main(args[:-1] + [str(other), "--overwrite"], capsys)
    assert code == 0 and len(loads) == 2
    again = json.loads((out / "report.json").read_text())
    assert again["datasets"]["general"]["perplexity"] == pytest.approx(report["datasets"]["general"]["perplexity"])
    assert again["baseline"] == str(other.resolve())


def test_cli_errors(dirs, capsys):
    code, cap = _main(["validate", "--model", str(dirs["base"]), "--dataset", str(dirs["general"]),
                       "--output", str(dirs["root"] / "x")], capsys)
    assert code == 2 and "not a NEXUS adapter" in cap.err and "--baseline" in cap.err
    code, cap = _main(["validate", "--model", str(dirs["zero"])], capsys)
    assert code == 2 and "nothing to do" in cap.err
    code, cap = _main(["validate", "--model", str(dirs["zero"]), "--dataset", str(dirs["general"]),
                       "--fail-on-degradation"], capsys)
    assert code == 2 and "--compute-perplexity" in cap.err
    (dirs["root"] / "taken").mkdir()
    code, cap = _main(["validate", "--model", str(dirs["zero"]), "--dataset", str(dirs["general"]),
                       "--output", str(dirs["root"] / "taken")], capsys)
    assert code == 2 and "--overwrite" in cap.err
    code, cap = _main(["validate", "--model", str(dirs["zero"]), "--dataset", str(dirs["root"] / "missing.txt"),
                       "--output", str(dirs["root"] / "y")], capsys)
    assert code == 2 and "missing.txt" in cap.err and not (dirs["root"] / "y").exists()


def test_validate_then_chat(dirs, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("the word of\n/exit\n"))
    code, cap = _main(["validate", "--model", str(dirs["zero"]), "--dataset", str(dirs["domain"]),
                       "--num-samples", "2", "--seq-len", "8", "--output", str(dirs["root"] / "with_chat"),
                       "--chat", "--temperature", "0", "--max-new-tokens", "4"], capsys)
    assert code == 0, cap.err
    report = json.loads((dirs["root"] / "with_chat" / "report.json").read_text())
    assert report["datasets"]["domain"]["perplexity"] is None  # --compute-perplexity not given
    assert "commands:" in cap.err
    reply = cap.out.strip().splitlines()[-1]
    assert len(reply.split()) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cli_on_gpu_bf16_matches_cpu(dirs):
    common = ["validate", "--model", dirs["random"], "--dataset", dirs["general"], "--compute-perplexity",
              "--num-samples", 4, "--seq-len", 16, "--batch-size", 2]
    figures = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        out = dirs["root"] / f"gpu_{device}"
        r = run_cli(*common, "--device", device, "--dtype", dtype, "--output", out)
        assert r.returncode == 0, r.stderr
        figures[device] = json.loads((out / "report.json").read_text())["datasets"]["general"]
    assert figures["cuda"]["tokens"] == figures["cpu"]["tokens"]
    assert figures["cuda"]["baseline_perplexity"] == pytest.approx(figures["cpu"]["baseline_perplexity"], rel=0.02)


def test_validate_on_the_demo_model_with_default_flags(tmp_path):
    """The bundled model has 256 positions: the default --seq-len fits it (1024 would be refused)."""
    from nexus.demo_data import DEMO_MODEL_DIR

    save_adapter_dir(DEMO_MODEL_DIR, tmp_path / "adapter", init="random")
    text = "def parse(header):\n    return header.split(':')\n" * 60  # longer than 256 tokens
    data = write_jsonl(tmp_path / "domain.jsonl", [{"text": text}] * 2)
    r = run_cli("validate", "--model", tmp_path / "adapter", "--dataset", f"domain={data}", "--output",
                tmp_path / "v", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    tokens = report["datasets"]["domain"]["tokens"]
    assert tokens > 256  # the documents were cut into 256-token sequences, not refused nor truncated away


def test_an_improvement_is_not_called_retention_or_degradation():
    d = lambda pct: {"tokens": 10, "perplexity": 1.0, "baseline_perplexity": 1.0, "degradation_pct": pct,  # noqa: E731
                     "kl": 0.0}
    report = {"model": "m", "baseline": "b", "datasets": {"domain": d(-12.9), "general": d(1.8)}, "layers": {}}
    assert overall_verdict(report) == EXCELLENT  # the worst dataset decides
    text = render_markdown(report)
    assert "| domain | 10 | 1.0000 | 1.0000 | -12.90 % | improved |" in text
    assert "| general | 10 | 1.0000 | 1.0000 | +1.80 % | excellent retention |" in text
    report["datasets"] = {"domain": d(-12.9)}
    assert overall_verdict(report) == IMPROVED
    assert "**improved** — every dataset's perplexity is lower" in render_markdown(report)
