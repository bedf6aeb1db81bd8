"""`nexus train --replay-dataset`: each step adds the KL to the base on general text. Its gradient is checked
against an autograd reference built from transformers' own forward of the base (the teacher) and of the
student; resume and the flag errors too (rank-count equivalence: tests/test_train_distributed.py)."""


import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from nexus.errors import NexusError
from nexus.train.config import TrainConfig
from nexus.train.metrics import read_metrics
from nexus.train.recipe import Trainer
from tiny import save_model_dir, train_in_process, write_text_dataset, write_word_dataset
from tiny import single_thread  # noqa: F401  (autouse: one thread per test process)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    general = write_word_dataset(root / "general.jsonl", n=20, seed=4)  # no pattern
    return save_model_dir(root / "model"), write_text_dataset(root / "data.jsonl", n=24), general


def _config(files, out, **kw):
    model_dir, data, general = files
    cfg = dict(student_model=str(model_dir), dataset=str(data), output_dir=str(out), seq_len=32, batch_size=2,
               max_steps=6, learning_rate=3e-3, init_strategy="random", checkpoint_interval=3, device="cpu",
               replay_dataset=str(general), replay_batches=2, replay_weight=0.7, kl_weight=0.5)
    cfg.update(kw)
    return TrainConfig(**cfg)


def _kl_sum(student_logits, teacher_logits, mask, temperature):
    """Σ over next-token positions of KL(teacher ‖ student) at T, from full logits (B, L, V)."""
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    s = F.log_softmax(student_logits[:, :-1][keep].double() / temperature, -1)
    t = F.log_softmax(teacher_logits[:, :-1][keep].double() / temperature, -1)
    return (t.exp() * (t - s)).sum(), int(keep.sum())


def test_replay_gradient_is_the_kl_to_the_base_on_the_replayed_text(files, tmp_path):
    model_dir = files[0]
    t = Trainer(_config(files, tmp_path / "out", max_steps=1))
    try:
        t.setup()
        with torch.no_grad():  # a student well away from the base, so that the KL terms weigh in the gradient
            for p in t.params.params:
                p.mul_(30)
        main, replay = t._micro_batches(0), t._replay_batches(0)
        assert len(replay) == 2 and all(b["ids"].shape[0] == 2 for b in replay)
        captured = {}
        clip = t.params.grad_norm_and_clip

        def capture(max_norm):
            captured.update({n: p.grad.clone() for n, p in zip(t.params.names, t.params.opt_params)})
            return clip(max_norm)

        t.params.grad_norm_and_clip = capture
        before = {n: p.detach().clone() for n, p in zip(t.params.names, t.params.params)}
        row = t._optimizer_step(0)
        with torch.no_grad():  # back to the step-0 weights for the reference
            for n, p in zip(t.params.names, t.params.params):
                p.copy_(before[n])
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        student = t.model.eval()
        T = 2.0

        def terms(batches):
            ce, kl, n = 0.0, 0.0, 0
            for b in batches:
                z = student(input_ids=b["ids"], attention_mask=b["mask"]).logits
                with torch.no_grad():
                    zt = base(input_ids=b["ids"], attention_mask=b["mask"]).logits
                keep = (b["mask"][:, :-1] * b["mask"][:, 1:]).bool()
                ce = ce + F.cross_entropy(z[:, :-1][keep].double(), b["ids"][:, 1:][keep], reduction="sum")
                k, m = _kl_sum(z, zt, b["mask"], T)
                kl, n = kl + k, n + m
            return ce / n, kl / n

        main_ce, main_kl = terms(main)
        _, replay_kl = terms(replay)
        loss = main_ce + 0.5 * T ** 2 * main_kl + 0.7 * T ** 2 * replay_kl
        params = dict(t.model.named_parameters())
        grads = torch.autograd.grad(loss, [params[n] for n in t.params.names], retain_graph=True)
        main_only = torch.autograd.grad(main_ce + 0.5 * T ** 2 * main_kl, [params[n] for n in t.params.names])
    finally:
        t.cleanup()
    assert row["replay_kl"] == pytest.approx(T ** 2 * replay_kl.item(), rel=1e-5)
    assert row["kl"] == pytest.approx(T ** 2 * main_kl.item(), rel=1e-5)
    assert row["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for n, g in zip(t.params.names, grads):
        torch.testing.assert_close(captured[n], g.float(), rtol=1e-4, atol=1e-7)
    # the replayed text moves the gradient: without it the reference is another one
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(grads, main_only))


def test_replay_resumes_exactly_and_a_changed_replay_is_refused(files, tmp_path):
    train_in_process(_config(files, tmp_path / "ref"))
    train_in_process(_config(files, tmp_path / "part"), steps=4)  # checkpoint-3, then killed
    train_in_process(_config(files, tmp_path / "part", resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3")))
    a = load_file(str(tmp_path / "ref" / "final" / "nexus_adapter.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "nexus_adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [(r["step"], r["loss"], r["replay_kl"]) for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")]
    assert rows == [(r["step"], r["loss"], r["replay_kl"]) for r in read_metrics(tmp_path / "part" / "metrics.jsonl")]
    assert all(r[2] > 0 for r in rows)
    with pytest.raises(NexusError, match="--replay-dataset"):
        train_in_process(_config(files, tmp_path / "part", replay_batches=1, max_steps=8,
                     resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3")))
    train_in_process(_config(files, tmp_path / "plain", replay_dataset=None), steps=3)
    with pytest.raises(NexusError, match="--replay-dataset"):  # replay added to a run made without it
        train_in_process(_config(files, tmp_path / "plain", resume_from_checkpoint="latest"))


def test_without_replay_the_field_is_null(files, tmp_path):
    train_in_process(_config(files, tmp_path / "out", replay_dataset=None, max_steps=2))
    assert [r["replay_kl"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")] == [None, None]


@pytest.mark.parametrize("kw, message", [
    (dict(precomputed_teacher="cache"), "--replay-dataset needs an online teacher"),
    (dict(replay_batches=0), "--replay-batches must be at least 1"),
    (dict(replay_weight=0.0), "--replay-weight must be a positive"),
    (dict(replay_weight=float("nan")), "--replay-weight must be a positive"),
])
def test_bad_flags_are_named(files, tmp_path, kw, message):
    with pytest.raises(NexusError, match=message):
        Trainer(_config(files, tmp_path / "o", **kw))
