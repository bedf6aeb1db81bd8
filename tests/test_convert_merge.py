"""Merge logic on in-memory experts: units view, linear assignment, average / aligned / concat."""

import itertools

import numpy as np
import pytest
import torch
from conftest import tiny_model

from nexus.convert.assignment import linear_assignment
from nexus.convert.merge import AlignedAverage, Average, Concat, from_units, to_units, widen
from nexus.moe import find_moe_blocks
from nexus.shared import build_shared_expert, init_shared_expert, run_shared_expert

LAYOUT_FAMILIES = ["gpt_oss", "qwen3_moe", "mixtral"]  # transposed+interleaved+biases; concatenated; renamed


def expert(block, j):
    """Expert j of an experts module: {param: tensor without the expert dim}."""
    return {n: p[j].detach().clone() for n, p in block.experts.named_parameters()}


def run_expert(block, j, x):
    """E_j(x) through the family's own experts module. x [T, H] -> [T, H]."""
    idx = torch.full((x.shape[0], 1), j, dtype=torch.long)
    return block.experts(x, idx, torch.ones(x.shape[0], 1))


def test_linear_assignment_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 7))
        cost = rng.integers(0, 4, (n, n)).astype(float) if trial % 2 else rng.normal(size=(n, n))
        col = linear_assignment(cost)
        best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert sorted(col) == list(range(n))
        assert cost[np.arange(n), col].sum() == pytest.approx(best)


def test_linear_assignment_recovers_a_permutation_of_noisy_features():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(300, 40))
    perm = rng.permutation(300)
    g = f[perm] + 0.05 * rng.normal(size=f.shape)  # g[perm^-1[u]] ≈ f[u]
    col = linear_assignment(-(f @ g.T))
    assert np.array_equal(perm[col], np.arange(300))


def test_linear_assignment_refuses_bad_input():
    with pytest.raises(ValueError, match="square"):
        linear_assignment(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        linear_assignment(np.array([[0.0, np.nan], [1.0, 0.0]]))


@pytest.mark.parametrize("family", LAYOUT_FAMILIES)
def test_units_round_trip(family):
    block = find_moe_blocks(tiny_model(family))[0]
    e = expert(block, 3)
    back = from_units(to_units(e, block.layout), block.layout)
    assert set(back) == set(e)
    for name in e:
        assert torch.equal(back[name], e[name].unsqueeze(0))


def test_units_of_gpt_oss_follow_its_interleaved_transposed_layout():
    block = find_moe_blocks(tiny_model("gpt_oss"))[0]
    e = expert(block, 1)  # gate_up [H, 2I] columns g0 u0 g1 u1 ..., down [I, H]
    units = to_units(e, block.layout)
    assert torch.equal(units["gate"][5], e["gate_up_proj"][:, 10])
    assert torch.equal(units["up"][5], e["gate_up_proj"][:, 11])
    assert torch.equal(units["up_bias"][5], e["gate_up_proj_bias"][11])
    assert torch.equal(units["down"][5], e["down_proj"][5])


def permuted_in_family_layout(e, layout, perm):
    """Expert e with hidden units reordered by `perm`, written directly in the family layout."""
    if layout.is_transposed:  # GPT-OSS: interleaved gate/up columns, down rows
        cols = torch.stack([2 * perm, 2 * perm + 1], dim=1).reshape(-1)
        return {"gate_up_proj": e["gate_up_proj"][:, cols], "gate_up_proj_bias": e["gate_up_proj_bias"][cols],
                "down_proj": e["down_proj"][perm], "down_proj_bias": e["down_proj_bias"]}
    inter = e["down_proj"].shape[1]
    rows = torch.cat([perm, inter + perm])  # [gate; up] rows, down columns
    return {"gate_up_proj": e["gate_up_proj"][rows], "down_proj": e["down_proj"][:, perm]}


@pytest.mark.parametrize("family", LAYOUT_FAMILIES)
def test_aligned_average_of_permuted_copies_recovers_the_expert(family):
    block = find_moe_blocks(tiny_model(family))[0]
    e0, layout = expert(block, 0), block.layout
    g = torch.Generator().manual_seed(0)
    merger, plain = AlignedAverage(), Average()
    for k, w in enumerate([0.5, 0.3, 0.2]):
        inter = layout.intermediate_size
        perm = torch.arange(inter) if k == 0 else torch.randperm(inter, generator=g)
        copy = permuted_in_family_layout(e0, layout, perm)
        merger.add(to_units(copy, layout), w)
        plain.add(to_units(copy, layout), w)
    aligned = from_units(merger.result(), layout)
    unaligned = from_units(plain.result(), layout)
    for name in e0:
        torch.testing.assert_close(aligned[name], e0[name].unsqueeze(0), rtol=0, atol=1e-6)
    assert not torch.allclose(unaligned["down_proj"], e0["down_proj"].unsqueeze(0), atol=1e-3)  # alignment mattered


@pytest.mark.parametrize("family", LAYOUT_FAMILIES)
def test_average_is_the_weighted_sum_of_parameters(family):
    block = find_moe_blocks(tiny_model(family))[0]
    picks, weights = [4, 0, 6], [0.6, 0.25, 0.15]
    merger = Average()
    for j, w in zip(picks, weights):
        merger.add(to_units(expert(block, j), block.layout), w)
    got = from_units(merger.result(), block.layout)
    for name, p in block.experts.named_parameters():
        want = sum(w * p[j].detach() for j, w in zip(picks, weights)).unsqueeze(0)
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-7)


def shared_from(block, model, tensors, width):
    shared = build_shared_expert(block, model, width)
    init_shared_expert(shared, tensors=tensors)
    return shared


@pytest.mark.parametrize("family", LAYOUT_FAMILIES)
def test_concat_computes_the_weighted_sum_of_expert_outputs(family):
    model = tiny_model(family)
    block = find_moe_blocks(model)[1]
    picks, weights = [2, 7, 5], [0.5, 0.3, 0.2]
    merger = Concat(len(picks))
    for j, w in zip(picks, weights):
        merger.add(to_units(expert(block, j), block.layout), w)
    shared = shared_from(block, model, from_units(merger.result(), block.layout), width=len(picks))
    x = torch.randn(16, block.layout.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = sum(w * run_expert(block, j, x) for j, w in zip(picks, weights))
        got = run_shared_expert(shared, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_widen_keeps_the_output(family):
    model = tiny_model(family)
    block = find_moe_blocks(model)[0]
    units = to_units(expert(block, 3), block.layout)
    wide = widen(units, 2 * block.layout.intermediate_size, std=0.02, generator=torch.Generator().manual_seed(0))
    assert wide["gate"].shape[0] == 2 * block.layout.intermediate_size and wide["gate"][-1].abs().sum() > 0
    narrow_m = shared_from(block, model, from_units(units, block.layout), 1)
    wide_m = shared_from(block, model, from_units(wide, block.layout), 2)
    x = torch.randn(8, block.layout.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(run_shared_expert(wide_m, x), run_shared_expert(narrow_m, x), rtol=1e-5, atol=1e-6)
