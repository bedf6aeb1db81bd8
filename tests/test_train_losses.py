"""Losses: chunked LM head, dense and sparse KL, router terms, and the recipe's loss on a fixed batch."""

import pytest
import torch
import torch.nn.functional as F

from nexus.routing import router_hooks
from nexus.shared import shared_experts_disabled
from nexus.train.config import TrainConfig
from nexus.train.losses import (chunked_head_loss, next_token_positions, router_kl, router_l1, sparse_router_terms,
                                sparse_token_kl, token_ce, token_kl)
from nexus.train.recipe import Trainer
from nexus.train.step import batch_loss
from nexus.stream import trim_padding
from tiny import save_model_dir, write_text_dataset
from tiny import single_thread  # noqa: F401  (autouse: one thread per test process)


def test_next_token_positions_skip_padding_and_sequence_ends():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    src, dst = next_token_positions(mask)
    assert src.tolist() == [0, 1, 4, 5, 6] and dst.tolist() == [1, 2, 5, 6, 7]


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_head_loss_equals_full_logits_value_and_gradient(chunk):
    torch.manual_seed(0)
    n, h_dim, vocab = 37, 16, 50
    hidden = torch.randn(n, h_dim, requires_grad=True)
    head = torch.nn.Linear(h_dim, vocab).requires_grad_(False)
    targets, teacher = torch.randint(0, vocab, (n,)), torch.randn(n, vocab)
    w = {"ce": 0.5, "kl": 3.0}
    total, sums = chunked_head_loss(hidden, head, lambda z, sl: {"ce": token_ce(z, targets[sl]),
                                                                 "kl": token_kl(z, teacher[sl], 2.0)}, w, chunk)
    (2 * total).backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    z = head(hidden)
    ce, kl = F.cross_entropy(z, targets, reduction="sum"), token_kl(z, teacher, 2.0).sum()
    (2 * (0.5 * ce + 3.0 * kl)).backward()
    assert total.item() == pytest.approx((0.5 * ce + 3.0 * kl).item(), rel=1e-6)
    assert sums["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    torch.testing.assert_close(grad, hidden.grad, rtol=1e-5, atol=1e-7)


def _teacher_topk(teacher_logits, k):
    logp = torch.log_softmax(teacher_logits, -1)
    values, indices = logp.topk(k, dim=-1)
    return values, indices


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_sparse_kl_with_k_equal_vocab_is_the_dense_kl(temperature):
    torch.manual_seed(1)
    s, t = torch.randn(20, 30), 3 * torch.randn(20, 30)
    values, indices = _teacher_topk(t, 30)
    torch.testing.assert_close(sparse_token_kl(s, values, indices, temperature), token_kl(s, t, temperature),
                               rtol=1e-5, atol=1e-6)


def test_sparse_kl_is_nonnegative_and_approaches_dense_as_k_grows():
    torch.manual_seed(2)
    s, t = torch.randn(64, 40), 3 * torch.randn(64, 40)
    dense = token_kl(s, t, 1.0)
    previous = torch.zeros(64)
    for k in (1, 2, 4, 8, 16, 32, 39, 40):
        sparse = sparse_token_kl(s, *_teacher_topk(t, k), 1.0)
        assert (sparse >= -1e-6).all()
        # At T = 1 a finer bucketing can only reveal more divergence: monotone up to the dense KL.
        assert (sparse >= previous - 1e-5).all() and (sparse <= dense + 1e-5).all()
        previous = sparse
    torch.testing.assert_close(previous, dense, rtol=1e-5, atol=1e-6)
    for temperature in (0.5, 2.0):  # tempered buckets: still proper distributions
        for k in (1, 5, 20):
            assert (sparse_token_kl(s, *_teacher_topk(t, k), temperature) >= -1e-6).all()


def test_sparse_kl_from_fp16_cache_is_close_and_has_finite_gradients():
    torch.manual_seed(3)
    s, t = torch.randn(16, 50, requires_grad=True), 4 * torch.randn(16, 50)
    values, indices = _teacher_topk(t, 8)
    exact = sparse_token_kl(s, values, indices, 2.0)
    stored = sparse_token_kl(s, values.half(), indices.int(), 2.0)
    torch.testing.assert_close(stored, exact, rtol=2e-2, atol=2e-3)
    stored.sum().backward()
    assert torch.isfinite(s.grad).all()
    s.grad = None
    sparse_token_kl(s, *_teacher_topk(t, 50), 2.0).sum().backward()  # empty tail bucket
    assert torch.isfinite(s.grad).all()


def test_router_terms():
    torch.manual_seed(4)
    s_logits, t_logits = torch.randn(10, 8), torch.randn(10, 8)
    p_s, p_t = torch.softmax(s_logits, -1), torch.softmax(t_logits, -1)
    assert router_kl(p_s, s_logits).abs().max() < 1e-6 and router_l1(p_s, p_s).max() == 0
    torch.testing.assert_close(router_kl(p_t, s_logits), F.kl_div(torch.log_softmax(s_logits, -1), p_t,
                                                                  reduction="none").sum(-1), rtol=1e-5, atol=1e-6)
    kl, l1 = sparse_router_terms(s_logits, *_teacher_topk(t_logits, 8))  # R = E: exact
    torch.testing.assert_close(kl, router_kl(p_t, s_logits), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1, router_l1(p_s, p_t), rtol=1e-5, atol=1e-6)
    _, l1_sparse = sparse_router_terms(s_logits, *_teacher_topk(t_logits, 2))
    assert (l1_sparse <= router_l1(p_s, p_t) + 1e-6).all()  # R < E: a lower bound


# --- the recipe's loss on a fixed batch --------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("losses")
    return save_model_dir(root / "model"), write_text_dataset(root / "data.jsonl", n=24)


def _trainer(files, tmp_path, **kw):
    model_dir, data = files
    cfg = dict(student_model=str(model_dir), dataset=str(data), output_dir=str(tmp_path / "out"), seq_len=48,
               max_steps=4, init_strategy="random", checkpoint_interval=100, device="cpu")
    cfg.update(kw)
    t = Trainer(TrainConfig(**cfg))
    t.setup()
    return t


def test_first_step_loss_equals_an_independent_computation(files, tmp_path):
    ce_w, kl_w, rk_w, temperature = 0.9, 0.7, 0.3, 2.0
    t = _trainer(files, tmp_path, pack=False, batch_size=3, ce_weight=ce_w, kl_weight=kl_w, router_kl_weight=rk_w,
                 temperature=temperature)
    try:
        ids, mask = t.stream.batch(t.layout.positions(0, 0, 0))
        assert (mask == 0).any()  # the fixed batch has padding
        model, routers = t.model, {"student": [], "teacher": []}
        with torch.no_grad():
            with router_hooks(model, lambda layer, logits, w, i: routers["now"].append(logits)):
                routers["now"] = routers["student"]
                s = model(input_ids=ids, attention_mask=mask).logits
                routers["now"] = routers["teacher"]
                with shared_experts_disabled(model):
                    te = model(input_ids=ids, attention_mask=mask).logits
        valid = (mask[:, :-1] * mask[:, 1:]).bool()
        s_v, t_v, y = s[:, :-1][valid], te[:, :-1][valid], ids[:, 1:][valid]
        ce = F.cross_entropy(s_v, y)
        kl = F.kl_div(F.log_softmax(s_v / temperature, -1), F.log_softmax(t_v / temperature, -1), log_target=True,
                      reduction="batchmean") * temperature ** 2
        real = mask.reshape(-1).bool()
        rkl = torch.stack([F.kl_div(F.log_softmax(a[real], -1), F.softmax(b[real], -1), reduction="batchmean")
                           for a, b in zip(routers["student"], routers["teacher"])]).mean()
        expected = ce_w * ce + kl_w * kl + rk_w * rkl
        row = t._optimizer_step(0)
        assert row["ce"] == pytest.approx(ce.item(), rel=1e-5)
        # Both KLs are ~1e-5 (student and teacher differ only by small random shared experts), so the fp32
        # roundoff of the two computations (other summation orders; other kernels on AVX2 and AVX-512
        # machines) shows at ~1e-8 absolute: compared within 1e-7, after checking they are not ~0 anyway.
        assert kl.item() > 1e-6 and rkl.item() > 1e-6
        assert row["kl"] == pytest.approx(kl.item(), rel=1e-4, abs=1e-7)
        assert row["router_kl"] == pytest.approx(rkl.item(), rel=1e-4, abs=1e-7)
        assert row["loss"] == pytest.approx(expected.item(), rel=1e-5)
    finally:
        t.cleanup()


def test_kl_is_zero_when_student_equals_teacher(files, tmp_path):
    t = _trainer(files, tmp_path, init_strategy="zero", batch_size=2)
    try:
        row = t._optimizer_step(0)
        assert row["kl"] == 0.0 and row["router_kl"] == pytest.approx(0.0, abs=1e-7)
        assert row["router_l1"] == 0.0 and row["router_entropy"] == pytest.approx(row["teacher_router_entropy"])
    finally:
        t.cleanup()


def test_padding_changes_nothing(files, tmp_path):
    t = _trainer(files, tmp_path, pack=False, batch_size=3, router_kl_weight=0.5)
    try:
        ids, mask = trim_padding(*t.stream.batch(t.layout.positions(0, 0, 0)))
        assert (mask == 0).any()
        longer_mask = torch.cat([mask, torch.zeros(ids.shape[0], 5, dtype=mask.dtype)], 1)
        longer_ids = torch.randint(3, 90, longer_mask.shape)  # garbage under the padding
        longer_ids[longer_mask == 1] = ids[mask == 1]
        results = []
        for i, m in ((ids, mask), (longer_ids, longer_mask)):
            loss, stats = batch_loss(t.student, t.head, t.capture, t.teacher, i, m, {"ce": 1.0, "kl": 1.0}, 0.5,
                                     2.0, 16)
            loss.backward()
            grads = [p.grad.clone() for p in t.params.params]
            t.params.zero_grad()
            results.append((loss.detach(), stats, grads))
        (l1, s1, g1), (l2, s2, g2) = results
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)  # KL sums are ~1e-4: float noise
        for a, b in zip(g1, g2):
            # float32 rounding of the summed terms scales with the tensor's largest gradient, not with each
            # entry (differences of 1.4e-7 on gradients of ~0.4); padding leaking in would be of that order
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
    finally:
        t.cleanup()


def test_a_bf16_head_on_cpu_is_multiplied_in_fp32_slices(monkeypatch):
    from nexus.base import cpu_matmul
    from nexus.train import losses

    monkeypatch.setattr(cpu_matmul, "_fast_cpu_gemm", lambda dtype: False)  # a CPU without a fast bf16 GEMM

    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 32, generator=g).bfloat16()
    w = (torch.randn(cpu_matmul.SLICE_BYTES // (32 * 4) + 77, 32, generator=g) * 0.1).bfloat16()  # more than one slice of rows
    b = torch.randn(w.shape[0], generator=g).bfloat16()
    want = torch.nn.functional.linear(h.double(), w.double(), b.double())  # exact products of the bf16 values
    torch.testing.assert_close(losses.head_logits(h, w, b).double(), want, rtol=1e-5, atol=1e-5)
    dz = torch.randn(6, w.shape[0], generator=g)
    torch.testing.assert_close(losses.head_input_grad(dz, w).double(), dz.double() @ w.double(), rtol=1e-5, atol=1e-4)


def test_down_lr_ratio_gives_the_down_projections_their_own_learning_rate():
    from conftest import tiny_model

    from nexus.shared import attach_shared_experts
    from nexus.train.optim import TrainableParams, build_optimizer, set_lr

    model = attach_shared_experts(tiny_model("qwen3_moe"), init="random", seed=0)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = TrainableParams(named)
    opt = build_optimizer(params, 1e-3, 0.0, down_lr_ratio=4.0)
    set_lr(opt, 2e-3)
    by_id = {id(p): n for n, p in named.items()}
    lrs = {by_id[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs.keys() == named.keys()
    down = {n for n in named if ".nexus_shared_expert.down_proj" in n}
    assert down and all(lrs[n] == pytest.approx(8e-3) for n in down)
    assert all(lrs[n] == pytest.approx(2e-3) for n in named.keys() - down)
    before = {n: p.detach().clone() for n, p in named.items()}
    for p in named.values():
        p.grad = torch.ones_like(p)
    opt.step()  # Adam's first step moves each weight by lr · g / |g| (eps aside)
    for n, p in named.items():
        torch.testing.assert_close((before[n] - p.detach()).abs().max().item(), lrs[n], rtol=1e-4, atol=0)


def test_gate_flag_puts_a_learnable_scalar_of_that_value_on_every_shared_expert(files, tmp_path):
    from nexus.shared import GATE_NAME, run_shared_expert, shared_expert_modules

    plain = _trainer(files, tmp_path / "plain", seed=3)
    gated = _trainer(files, tmp_path / "gated", seed=3, gate=0.1)
    assert gated.model.nexus_config.gate and not plain.model.nexus_config.gate
    gates = {path: getattr(m, GATE_NAME) for path, m in shared_expert_modules(gated.model).items()}
    assert gates and all(g.detach().item() == pytest.approx(0.1) and g.requires_grad for g in gates.values())
    assert all(any(p is g for p in gated.params.params) for g in gates.values())  # in the optimizer
    x = torch.randn(5, gated.model.config.hidden_size)
    for path, m in shared_expert_modules(gated.model).items():
        ref = shared_expert_modules(plain.model)[path]  # same seed: same weights, no gate
        torch.testing.assert_close(run_shared_expert(m, x), 0.1 * run_shared_expert(ref, x))


def test_gate_flag_is_refused_for_an_adapter_and_when_not_finite(files, tmp_path):
    from nexus.convert.core import convert
    from nexus.errors import NexusError

    with pytest.raises(NexusError, match="--gate must be a finite number"):
        TrainConfig(student_model="x", dataset="y", output_dir="z", init_strategy="random", gate=float("nan")).check()
    model_dir, data = files
    adapter = tmp_path / "adapter"
    convert(str(model_dir), str(adapter), "random", check=False, log=lambda *a, **k: None)
    with pytest.raises(NexusError, match="--gate applies to a base model"):
        _trainer((adapter, data), tmp_path, init_strategy=None, gate=0.5)
