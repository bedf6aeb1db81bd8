"""`convert` end to end (Python API): each strategy's adapter against tensors computed here from the model."""

import json
import re

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from test_convert_checkpoint import write_mxfp4_gpt_oss
from test_convert_merge import permuted_in_family_layout, run_expert

import nexus
from nexus.adapter import CONFIG_NAME, WEIGHTS_NAME
from nexus.convert.core import convert
from nexus.errors import NexusError
from nexus.moe import find_moe_blocks
from nexus.shared import SHARED_NAME, run_shared_expert

SELECTION = {"0": {"selected_experts": [3, 1, 6, 0], "weights": [0.4, 0.3, 0.2, 0.1]},
             "1": {"selected_experts": [0, 7, 2, 5], "weights": [0.25, 0.25, 0.25, 0.25]}}


def write_pca_stats(path, layers=SELECTION, num_experts=8):
    """A hand-written pca_stats.json: only format, version, num_experts and the selection per layer."""
    path.write_text(json.dumps({"format": "nexus-pca-stats", "version": 1, "num_experts": num_experts,
                                "layers": layers}))
    return path


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{name: (checkpoint dir, reference model holding exactly what the checkpoint stores)}."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    root = tmp_path_factory.mktemp("bases")
    write_mxfp4_gpt_oss(root / "gpt_oss_mxfp4")
    mx_ref = AutoModelForCausalLM.from_pretrained(root / "gpt_oss_mxfp4", dtype=torch.float32,
                                                  quantization_config=Mxfp4Config(dequantize=True))
    qwen = tiny_model("qwen3_moe")
    qwen.save_pretrained(root / "qwen3_moe")
    return {"gpt_oss_mxfp4": (root / "gpt_oss_mxfp4", mx_ref.eval()), "qwen3_moe": (root / "qwen3_moe", qwen)}


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    return write_pca_stats(tmp_path_factory.mktemp("stats") / "pca_stats.json")


def adapter_tensors(out, block):
    state = load_file(str(out / WEIGHTS_NAME))
    prefix = f"{block.path}.{SHARED_NAME}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def selection(layer, k):
    sel = SELECTION[str(layer)]
    w = sel["weights"][:k]
    return sel["selected_experts"][:k], [x / sum(w) for x in w]


@pytest.mark.parametrize("base", ["gpt_oss_mxfp4", "qwen3_moe"])
@pytest.mark.parametrize("kind", ["pca", "frequency"])
def test_average_strategies_write_the_weighted_average(bases, stats, tmp_path, base, kind):
    src, ref = bases[base]
    out = tmp_path / "adapter"
    summary = convert(src, out, f"{kind}_top3", pca_stats=stats, check=False, log=quiet)
    assert summary["experts_read"] == 6 and summary["layers"] == 2
    for block in find_moe_blocks(ref):
        experts, weights = selection(block.layer, 3)
        got = adapter_tensors(out, block)
        for name, p in block.experts.named_parameters():
            want = sum(w * p[j].detach() for j, w in zip(experts, weights)).unsqueeze(0)
            torch.testing.assert_close(got[name], want, rtol=0, atol=1e-7)
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["init_strategy"] == f"{kind}_top3" and cfg["init"]["pca_stats"] == str(stats.resolve())
    assert cfg["init"]["layers"]["1"] == {"experts": [0, 7, 2], "weights": pytest.approx([1 / 3] * 3)}


@pytest.mark.parametrize("base", ["gpt_oss_mxfp4", "qwen3_moe"])
def test_concat_adapter_computes_the_weighted_sum_exactly(bases, stats, tmp_path, base):
    src, ref = bases[base]
    out = tmp_path / "adapter"
    convert(src, out, "concat_top4", pca_stats=stats, log=quiet)  # sanity forward included
    model = nexus.load_model(out, dtype=torch.float32)
    assert json.loads((out / CONFIG_NAME).read_text())["width_multiplier"] == 4
    x = torch.randn(12, ref.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for ref_block, block in zip(find_moe_blocks(ref), find_moe_blocks(model)):
        experts, weights = selection(ref_block.layer, 4)
        with torch.no_grad():
            want = sum(w * run_expert(ref_block, j, x) for j, w in zip(experts, weights))
            got = run_shared_expert(getattr(block.block, SHARED_NAME), x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", ["gpt_oss_mxfp4", "qwen3_moe"])
def test_feature_init_preserves_the_model_and_takes_the_experts_units(bases, stats, tmp_path, base):
    from nexus.convert.merge import to_units
    from nexus.shared import shared_experts_disabled

    src, ref = bases[base]
    out = tmp_path / "adapter"
    convert(src, out, "feature_top2", pca_stats=stats, log=quiet)  # width 1: I of the 2·I units
    model = nexus.load_model(out, dtype=torch.float32)
    cfg = json.loads((out / CONFIG_NAME).read_text())
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits
        with shared_experts_disabled(model):
            plain = model(ids).logits
    assert torch.equal(got, plain)  # the shared experts output exactly zero at step 0
    for ref_block, block in zip(find_moe_blocks(ref), find_moe_blocks(model)):
        experts, _ = selection(ref_block.layer, 2)
        layout = ref_block.layout
        kept = cfg["init"]["layers"][str(ref_block.layer)]["kept_units"]
        assert len(kept) == layout.intermediate_size and len(set(kept)) == len(kept)
        units = [to_units({n: p[j].detach() for n, p in ref_block.experts.named_parameters()}, layout) for j in experts]
        ours = to_units({k: v[0] for k, v in adapter_tensors(out, block).items()}, layout)
        for key in ("gate", "up", "gate_bias", "up_bias"):
            if key in ours:
                want = torch.cat([u[key] for u in units])[kept]  # the two experts' units side by side, kept ones
                torch.testing.assert_close(ours[key], want.float(), rtol=0, atol=0)
        assert not ours["down"].any() and not ours.get("down_bias", torch.zeros(1)).any()
    shared = [p for n, p in model.named_parameters() if SHARED_NAME in n and "down_proj" in n and "bias" not in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in shared:
        p.requires_grad_(True)
    model(ids).logits.float().pow(2).mean().backward()
    assert shared and all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared)  # the down rows learn


def test_feature_init_wider_than_its_experts_adds_random_units(bases, stats, tmp_path):
    from nexus.convert.merge import to_units

    src, ref = bases["qwen3_moe"]
    out = tmp_path / "adapter"
    convert(src, out, "feature_top2", pca_stats=stats, width_multiplier=3, check=False, log=quiet)
    block = find_moe_blocks(ref)[0]
    layout, inter = block.layout, block.layout.intermediate_size
    ours = to_units({k: v[0] for k, v in adapter_tensors(out, block).items()}, layout)
    experts, _ = selection(block.layer, 2)
    units = [to_units({n: p[j].detach() for n, p in block.experts.named_parameters()}, layout) for j in experts]
    assert ours["up"].shape[0] == 3 * inter
    torch.testing.assert_close(ours["up"][:2 * inter], torch.cat([u["up"] for u in units]), rtol=0, atol=0)
    assert ours["up"][2 * inter:].abs().sum() > 0 and not ours["down"].any()  # new units: random in, zero out
    assert "kept_units" not in json.loads((out / CONFIG_NAME).read_text())["init"]["layers"]["0"]


@pytest.mark.parametrize("base", ["gpt_oss_mxfp4", "qwen3_moe"])
def test_pruned_concat_is_concat_at_full_width_and_keeps_its_strongest_units_below(bases, stats, tmp_path, base):
    from nexus.convert.merge import to_units

    src, ref = bases[base]
    convert(src, tmp_path / "concat", "concat_top2", pca_stats=stats, check=False, log=quiet)
    convert(src, tmp_path / "full", "pruned_top2", pca_stats=stats, width_multiplier=2, check=False, log=quiet)
    convert(src, tmp_path / "half", "pruned_top2", pca_stats=stats, check=False, log=quiet)  # width 1
    kept = json.loads((tmp_path / "half" / CONFIG_NAME).read_text())["init"]["layers"]
    for block in find_moe_blocks(ref):
        concat = adapter_tensors(tmp_path / "concat", block)
        full = adapter_tensors(tmp_path / "full", block)
        assert concat.keys() == full.keys() and all(torch.equal(concat[k], full[k]) for k in concat)
        units = to_units({k: v[0] for k, v in concat.items()}, block.layout)
        half = to_units({k: v[0] for k, v in adapter_tensors(tmp_path / "half", block).items()}, block.layout)
        rows = kept[str(block.layer)]["kept_units"]
        assert len(rows) == block.layout.intermediate_size
        for key, v in half.items():
            want = units[key] if key == "down_bias" else units[key][rows]
            torch.testing.assert_close(v, want, rtol=0, atol=0)


def read_hidden_sample(path, layer):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(f"layers.{layer}.hidden")


def write_hidden_sample(path, model, tokens=48, layers=None, hidden_size=None, seed=0):
    """A raw sample as `nexus collect --keep-raw N --keep-hidden` writes it, with random hidden states."""
    from nexus.stats.reservoir import RawReservoir

    blocks = find_moe_blocks(model)
    layers = [b.layer for b in blocks] if layers is None else layers
    h = hidden_size or model.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    res = RawReservoir(layers, blocks[0].layout.num_experts, tokens, hidden_size=h)
    for i in layers:
        probs = torch.softmax(torch.randn(tokens, blocks[0].layout.num_experts, generator=gen), -1)
        res.offer(i, probs, batch_index=0, hidden=torch.randn(tokens, h, generator=gen))
    return res.save(path)


def unit_output_sizes(block, experts, weights, x):
    """Per hidden unit of the concatenated experts (k·I + j): w_k × mean over x of ‖E_k(x) − E_k(x) without unit
    j‖, through transformers' experts module with unit j's down projection zeroed: mean |a_j| × ‖w_k down_j‖."""
    import copy

    scores = []
    for e, w in zip(experts, weights):
        full = run_expert(block, e, x)
        for j in range(block.layout.intermediate_size):
            pruned = copy.deepcopy(block.experts)
            with torch.no_grad():
                if block.layout.is_transposed:  # down_proj [E, I, H]
                    pruned.down_proj[e, j, :] = 0
                else:  # down_proj [E, H, I]
                    pruned.down_proj[e, :, j] = 0
                idx = torch.full((x.shape[0], 1), e, dtype=torch.long)
                diff = full - pruned(x, idx, torch.ones(x.shape[0], 1))
            scores.append(w * diff.norm(dim=1).mean())
    return torch.stack(scores)


@pytest.mark.parametrize("base", ["gpt_oss_mxfp4", "qwen3_moe"])
def test_hidden_sample_keeps_the_units_that_add_the_most_output_on_it(bases, stats, tmp_path, base):
    from nexus.convert.core import mean_abs_activations
    from nexus.convert.merge import Concat, to_units
    src, ref = bases[base]
    sample = write_hidden_sample(tmp_path / "rs.raw.safetensors", ref)
    for kind in ("pruned", "feature"):
        convert(src, tmp_path / kind, f"{kind}_top2", pca_stats=stats, check=False, log=quiet, hidden_sample=sample)
    cfg = json.loads((tmp_path / "pruned" / CONFIG_NAME).read_text())
    assert cfg["init"]["hidden_sample"] == str(sample.resolve())
    feature = json.loads((tmp_path / "feature" / CONFIG_NAME).read_text())["init"]["layers"]
    for block in find_moe_blocks(ref):
        experts, weights = selection(block.layer, 2)
        x = read_hidden_sample(sample, block.layer)
        want = unit_output_sizes(block, experts, weights, x)  # (2 I,)
        kept = cfg["init"]["layers"][str(block.layer)]["kept_units"]
        assert kept == sorted(torch.topk(want, block.layout.intermediate_size).indices.tolist())
        assert feature[str(block.layer)]["kept_units"] == kept  # feature keeps the same units, down zero
        concat = Concat(2)
        for e, w in zip(experts, weights):
            concat.add(to_units({n: p[e].detach() for n, p in block.experts.named_parameters()}, block.layout), w)
        units = concat.result()
        got = mean_abs_activations(block, ref, units, block.layout, x) * units["down"].norm(dim=1)
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-7)
        half = adapter_tensors(tmp_path / "pruned", block)
        torch.testing.assert_close(half["down_proj"][0], units["down"][kept].T if not block.layout.is_transposed
                                   else units["down"][kept], rtol=0, atol=0)


def test_hidden_sample_ranks_an_averaged_experts_units_below_width_one(bases, stats, tmp_path):
    import copy

    src, ref = bases["qwen3_moe"]
    sample = write_hidden_sample(tmp_path / "rs.raw.safetensors", ref)
    convert(src, tmp_path / "out", "pca_top2", pca_stats=stats, width_multiplier=0.5, check=False, log=quiet,
            hidden_sample=sample)
    kept = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())["init"]["layers"]
    for block in find_moe_blocks(ref):
        experts, weights = selection(block.layer, 2)
        average = copy.copy(block)  # expert 0 of a copy of the experts module holds the weighted average
        average.experts = copy.deepcopy(block.experts)
        with torch.no_grad():
            for name, p in average.experts.named_parameters():
                p[0] = sum(w * p[e] for e, w in zip(experts, weights))
        want = unit_output_sizes(average, [0], [1.0], read_hidden_sample(sample, block.layer))
        assert kept[str(block.layer)]["kept_units"] == sorted(torch.topk(want, block.layout.intermediate_size // 2)
                                                              .indices.tolist())


@pytest.mark.parametrize("case", ["no_hidden", "width", "layer", "strategy", "full_width"])
def test_hidden_sample_refusals(bases, stats, tmp_path, case):
    from nexus.stats.reservoir import RawReservoir

    src, ref = bases["qwen3_moe"]
    path, strategy, width = tmp_path / "rs.raw.safetensors", "pruned_top2", None
    expected = {"no_hidden": "holds no hidden states (collect it with --keep-raw N --keep-hidden)",
                "width": f"hidden states of width 5, the experts of {src} read {ref.config.hidden_size}",
                "layer": "no hidden states for MoE layers [1]",
                "strategy": "pca_top2 at width 1 keeps all of them",
                "full_width": "pruned_top2 at width 2 keeps all of them"}[case]
    if case == "no_hidden":
        RawReservoir([0, 1], 8, 4).save(path)
    else:
        write_hidden_sample(path, ref, hidden_size=5 if case == "width" else None,
                            layers=[0] if case == "layer" else None)
    strategy = "pca_top2" if case == "strategy" else strategy
    width = 2 if case == "full_width" else width
    with pytest.raises(NexusError, match=re.escape(expected)):
        convert(src, tmp_path / "out", strategy, pca_stats=stats, width_multiplier=width, check=False, log=quiet,
                hidden_sample=path)
    assert not (tmp_path / "out").exists()


def test_gate_scales_the_shared_output_and_is_trainable(bases, stats, tmp_path):
    src, ref = bases["qwen3_moe"]
    convert(src, tmp_path / "plain", "pca_top2", pca_stats=stats, check=False, log=quiet)
    convert(src, tmp_path / "gated", "pca_top2", pca_stats=stats, gate=0.1, log=quiet)  # sanity check included
    assert json.loads((tmp_path / "gated" / CONFIG_NAME).read_text())["gate"] is True
    plain, gated = nexus.load_model(tmp_path / "plain"), nexus.load_model(tmp_path / "gated")
    x = torch.randn(6, ref.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for a, b in zip(find_moe_blocks(plain), find_moe_blocks(gated)):
        g = getattr(getattr(b.block, SHARED_NAME), "nexus_gate")
        assert g.item() == pytest.approx(0.1) and g.requires_grad
        with torch.no_grad():
            want = 0.1 * run_shared_expert(getattr(a.block, SHARED_NAME), x)
            got = run_shared_expert(getattr(b.block, SHARED_NAME), x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(NexusError, match="--gate must be a finite number"):
        convert(src, tmp_path / "bad", "zero", gate=float("nan"), log=quiet)


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_aligned_recovers_an_expert_from_permuted_copies(tmp_path, family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every expert becomes a permutation of expert 0
        for block in find_moe_blocks(model):
            e0 = {n: p[0].clone() for n, p in block.experts.named_parameters()}
            for j in range(1, block.layout.num_experts):
                perm = torch.randperm(block.layout.intermediate_size, generator=g)
                for n, t in permuted_in_family_layout(e0, block.layout, perm).items():
                    getattr(block.experts, n)[j] = t
    model.save_pretrained(tmp_path / "base")
    stats = write_pca_stats(tmp_path / "pca.json")
    convert(tmp_path / "base", tmp_path / "adapter", "aligned_top4", pca_stats=stats, check=False, log=quiet)
    for block in find_moe_blocks(model):
        got = adapter_tensors(tmp_path / "adapter", block)
        anchor = selection(block.layer, 4)[0][0]  # the most important expert sets the unit order
        for n, p in block.experts.named_parameters():
            torch.testing.assert_close(got[n], p[anchor].detach().unsqueeze(0), rtol=0, atol=1e-6)


def test_width_multiplier_and_scale(bases, stats, tmp_path):
    src, ref = bases["gpt_oss_mxfp4"]
    convert(src, tmp_path / "w1", "pca_top2", pca_stats=stats, check=False, log=quiet)
    convert(src, tmp_path / "w2", "pca_top2", pca_stats=stats, width_multiplier=2, scale=0.5, check=False, log=quiet)
    block = find_moe_blocks(ref)[0]
    one, two = adapter_tensors(tmp_path / "w1", block), adapter_tensors(tmp_path / "w2", block)
    inter = block.layout.intermediate_size
    assert two["gate_up_proj"].shape == (1, block.layout.hidden_size, 4 * inter)
    torch.testing.assert_close(two["down_proj"][:, :inter], 0.5 * one["down_proj"], rtol=0, atol=0)
    assert two["down_proj"][:, inter:].abs().sum() == 0  # extra units add nothing until trained
    torch.testing.assert_close(two["down_proj_bias"], 0.5 * one["down_proj_bias"], rtol=0, atol=0)
    assert json.loads((tmp_path / "w2" / CONFIG_NAME).read_text())["intermediate_size"] == 2 * inter


def test_zero_and_random(bases, tmp_path):
    src, ref = bases["qwen3_moe"]
    convert(src, tmp_path / "zero", "zero", check=False, log=quiet)
    convert(src, tmp_path / "random", "random", seed=3, check=False, log=quiet)
    block = find_moe_blocks(ref)[1]
    assert all(t.abs().sum() == 0 for t in adapter_tensors(tmp_path / "zero", block).values())
    rnd = adapter_tensors(tmp_path / "random", block)["gate_up_proj"]
    assert abs(rnd.std().item() - ref.config.initializer_range) < 0.005


def test_adapter_matches_save_adapter_and_loads(bases, stats, tmp_path):
    """The adapter equals what attach_shared_experts + save_adapter write for the same tensors, and runs."""
    src, ref = bases["qwen3_moe"]
    out = tmp_path / "adapter"
    convert(src, out, "pca_top4", pca_stats=stats, log=quiet)
    ours = json.loads((out / CONFIG_NAME).read_text())
    state = load_file(str(out / WEIGHTS_NAME))
    base = nexus.load_model(src, dtype=torch.float32)
    tensors = {b.layer: adapter_tensors(out, b) for b in find_moe_blocks(base)}
    nexus.attach_shared_experts(base, tensors=tensors)
    nexus.save_adapter(base, tmp_path / "reference")
    reference = json.loads((tmp_path / "reference" / CONFIG_NAME).read_text())
    assert {k: v for k, v in ours.items() if k not in ("init_strategy", "init")} == \
        {k: v for k, v in reference.items() if k != "init_strategy"}
    ref_state = load_file(str(tmp_path / "reference" / WEIGHTS_NAME))
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)

    model = nexus.load_model(out, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        base_logits = ref(input_ids=ids).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, base_logits)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(t.numel() for t in state.values())


def test_dry_run_writes_nothing(bases, stats, tmp_path):
    from nexus.convert.checkpoint import ExpertReader

    src, _ = bases["gpt_oss_mxfp4"]
    lines = []
    result = convert(src, tmp_path / "out", "aligned_top4", pca_stats=stats, dry_run=True, log=lines.append)
    text = "\n".join(lines)
    assert result["dry_run"] and list(tmp_path.iterdir()) == []
    assert "3:0.400 1:0.300 6:0.200 0:0.100" in text and "expert bytes to read" in text and "estimated memory" in text
    plan = result["plan"]
    assert plan.layers[0].read_bytes == 4 * ExpertReader(src).expert_nbytes(0)
    assert plan.read_bytes == 2 * plan.layers[0].read_bytes


def test_plan_notes_a_selection_ranked_differently(bases, tmp_path):
    src, _ = bases["qwen3_moe"]
    stats = json.loads(write_pca_stats(tmp_path / "p.json").read_text())
    stats["selection"] = {"top_k": 4, "importance": "pca"}
    (tmp_path / "p.json").write_text(json.dumps(stats))
    lines = []
    convert(src, tmp_path / "out", "frequency_top2", pca_stats=tmp_path / "p.json", dry_run=True, log=lines.append)
    assert "ranked experts by 'pca', the strategy is named frequency_top2" in "\n".join(lines)


def test_fractional_width_keeps_the_merged_experts_strongest_units(bases, stats, tmp_path):
    from nexus.convert.merge import strongest_units, to_units

    src, ref = bases["qwen3_moe"]  # expert intermediate 16: a quarter is 4 units
    convert(src, tmp_path / "full", "pca_top2", pca_stats=stats, check=False, log=quiet)
    convert(src, tmp_path / "quarter", "pca_top2", pca_stats=stats, width_multiplier=0.25, log=quiet)  # + sanity check
    cfg = json.loads((tmp_path / "quarter" / CONFIG_NAME).read_text())
    assert cfg["width_multiplier"] == 0.25 and cfg["intermediate_size"] == 4
    for block in find_moe_blocks(ref):
        full, quarter = adapter_tensors(tmp_path / "full", block), adapter_tensors(tmp_path / "quarter", block)
        kept = cfg["init"]["layers"][str(block.layer)]["kept_units"]
        units = to_units({k: v[0] for k, v in full.items()}, block.layout)
        assert kept == strongest_units(units, 4) and len(set(kept)) == 4  # the provenance names the kept units
        index = torch.tensor(kept)
        gate, up = full["gate_up_proj"][0].chunk(2, dim=0)  # qwen3: [2I, H], gate rows then up rows
        torch.testing.assert_close(quarter["gate_up_proj"][0], torch.cat([gate[index], up[index]]), rtol=0, atol=0)
        torch.testing.assert_close(quarter["down_proj"][0], full["down_proj"][0][:, index], rtol=0, atol=0)
    model = nexus.load_model(tmp_path / "quarter", dtype=torch.float32)  # the recorded size is rebuilt exactly
    assert model.nexus_config.intermediate_size == 4


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_convert_an_fp8_checkpoint_with_its_sanity_check(tmp_path, stats, layout):
    from quant_checkpoints import load_dequantized_reference, write_fp8_checkpoint

    write_fp8_checkpoint("deepseek_v3", tmp_path / "base", layout)
    layers = {"1": SELECTION["0"], "2": SELECTION["1"]}  # deepseek's first layer is dense
    pca = write_pca_stats(tmp_path / "pca.json", layers)
    summary = convert(tmp_path / "base", tmp_path / "adapter", "pca_top3", pca_stats=pca, log=quiet)
    assert summary["check_max_logit_change"] is not None  # the sanity forward ran on the packed FP8 base
    ref = load_dequantized_reference(tmp_path / "base", dtype=torch.float32)
    for block in find_moe_blocks(ref):
        sel = layers[str(block.layer)]
        experts, w = sel["selected_experts"][:3], sel["weights"][:3]
        weights = [x / sum(w) for x in w]
        got = adapter_tensors(tmp_path / "adapter", block)
        for name, p in block.experts.named_parameters():
            want = sum(wt * p[j].detach() for j, wt in zip(experts, weights)).unsqueeze(0)
            torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)
