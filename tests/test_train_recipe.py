"""`nexus train` end to end on tiny models, in process: learning, frozen base, checkpoints, router modes."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import nexus
from nexus.cli import main
from nexus.data import load_tokenizer
from nexus.errors import NexusError
from nexus.train.checkpoint import OPTIMIZER, RNG
from nexus.train.config import TrainConfig
from nexus.train.metrics import FIELDS, read_metrics
from nexus.train.recipe import Trainer
from nexus.train.teachers import ModelTeacher, SelfTeacher
from tiny import base_state, make_tokenizer, save_model_dir, write_text_dataset
from tiny import single_thread  # noqa: F401  (autouse: one thread per test process)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    return save_model_dir(root / "model"), write_text_dataset(root / "data.jsonl", n=24)


def _config(files, out, **kw):
    model_dir, data = files
    cfg = dict(student_model=str(model_dir), dataset=str(data), output_dir=str(out), seq_len=32, batch_size=2,
               max_steps=6, learning_rate=3e-3, init_strategy="random", checkpoint_interval=3, device="cpu")
    cfg.update(kw)
    return TrainConfig(**cfg)


def _run(cfg) -> Trainer:
    t = Trainer(cfg)
    try:
        t.setup()
        t.train()
    finally:
        t.cleanup()
    return t


def _shared(state):
    return {k: v for k, v in state.items() if "nexus_shared_expert" in k}


def test_short_run_learns_keeps_the_base_and_writes_loadable_adapters(files, tmp_path):
    out = tmp_path / "out"
    t = _run(_config(files, out, max_steps=12, checkpoint_interval=6, eval_dataset=str(files[1]), eval_every=6))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert set(FIELDS) <= set(rows[0]) and "eval_loss" in rows[5] and "eval_loss" in rows[11]
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3]) - 0.1

    # Every base parameter (routers included: --freeze-router is the default) is bit-identical to the disk.
    on_disk = base_state(nexus.load_model(files[0]))
    trained = base_state(t.model)
    assert on_disk.keys() == trained.keys()
    assert all(torch.equal(on_disk[k], trained[k]) for k in on_disk)

    # checkpoint-6 and final/ load as adapters; only trainable weights are stored.
    final = nexus.load_model(out / "final")
    expected = _shared(t.model.state_dict())
    assert all(torch.equal(v, final.state_dict()[k]) for k, v in expected.items())
    mid = load_file(str(out / "checkpoint-6" / "nexus_adapter.safetensors"))
    assert mid.keys() == expected.keys() and not all(torch.equal(mid[k], expected[k]) for k in mid)
    nexus.load_model(out / "checkpoint-6")
    assert (out / "checkpoint-6" / OPTIMIZER).is_file() and not (out / "final" / OPTIMIZER).is_file()
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["consumed_sequences"] == 12 and state["router"]["trainable"] is False

    # The optimizer state loads with weights_only=True.
    torch.load(out / "checkpoint-6" / OPTIMIZER, weights_only=True)

    with pytest.raises(SystemExit) as e:
        main(["plot-metrics", str(out)])
    assert e.value.code == 0 and (out / "plots" / "metrics.png").stat().st_size > 10_000


def test_gradient_checkpointing_really_recomputes_and_changes_nothing(files, tmp_path):
    results = []
    for flag in (False, True):
        t = Trainer(_config(files, tmp_path / f"gc{flag}", gradient_checkpointing=flag))
        t.setup()
        calls = []
        experts = t.model.model.layers[0].mlp.experts
        handle = experts.register_forward_hook(lambda *a: calls.append(1))
        try:
            row = t._optimizer_step(0)
        finally:
            handle.remove()
            t.cleanup()
        assert t.model.training
        results.append((row, len(calls), {k: v.detach().clone() for k, v in t.params.values().items()}))
    (plain, n_plain, w_plain), (ckpt, n_ckpt, w_ckpt) = results
    assert n_plain == 2 and n_ckpt == 3  # teacher + student forward, + the recompute in backward
    assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    for k in w_plain:
        torch.testing.assert_close(w_ckpt[k], w_plain[k], rtol=1e-5, atol=1e-7)


def _router(state):
    return {k: v for k, v in state.items() if k.endswith("gate.weight") and "nexus" not in k}


def test_router_trainable_then_frozen_at_the_ratio_also_across_resume(files, tmp_path):
    base = _router(nexus.load_model(files[0]).state_dict())
    cfg = _config(files, tmp_path / "a", max_steps=6, checkpoint_interval=2, bias_freeze_ratio=0.5)
    assert cfg.train_router and cfg.router_freeze_step == 3
    _run(cfg)
    ck = {n: load_file(str(tmp_path / "a" / n / "nexus_adapter.safetensors"))
          for n in ("checkpoint-2", "checkpoint-4", "final")}
    r2, r4, rf = (_router(ck[n]) for n in ("checkpoint-2", "checkpoint-4", "final"))
    assert r2.keys() == base.keys() and len(base) == 2
    assert all(not torch.equal(r2[k], base[k]) for k in base)  # trained during steps 1-3
    assert all(not torch.equal(r4[k], r2[k]) for k in base)  # step 3 still trained it
    assert all(torch.equal(rf[k], r4[k]) for k in base)  # frozen from step 4 on
    state = json.loads((tmp_path / "a" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["router"] == {"trainable": True, "freeze_step": 3, "frozen": True}

    for start in ("checkpoint-2", "checkpoint-4"):  # resume before and after the freeze: the same run
        resumed = tmp_path / f"from-{start}"
        _run(_config(files, resumed, max_steps=6, checkpoint_interval=2, bias_freeze_ratio=0.5,
                     resume_from_checkpoint=str(tmp_path / "a" / start)))
        again = load_file(str(resumed / "final" / "nexus_adapter.safetensors"))
        assert again.keys() == ck["final"].keys()
        for k in again:
            torch.testing.assert_close(again[k], ck["final"][k], rtol=0, atol=0)


def test_resume_says_when_rng_states_cannot_be_restored(files, tmp_path, caplog):
    _run(_config(files, tmp_path / "a", max_steps=2, checkpoint_interval=1))
    two_ranks = tmp_path / "two-ranks"  # a checkpoint as 2 processes write it, resumed by 1
    shutil.copytree(tmp_path / "a" / "checkpoint-1", two_ranks)
    state = torch.load(two_ranks / RNG, weights_only=True)
    torch.save(state * 2, two_ranks / RNG)
    with caplog.at_level("WARNING", logger="nexus.train"):
        _run(_config(files, tmp_path / "b", max_steps=2, resume_from_checkpoint=str(two_ranks)))
    assert "RNG states not restored (it holds the RNG states of 2 processes, this run has 1)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="nexus.train"):
        _run(_config(files, tmp_path / "c", max_steps=2, resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1")))
    assert "RNG states" not in caplog.text


def test_bf16_base_trains_a_router_through_fp32_masters(files, tmp_path):
    t = Trainer(_config(files, tmp_path / "bf16", dtype="bfloat16", freeze_router=False, max_steps=2))
    t.setup()
    try:
        before = base_state(t.model)
        t._optimizer_step(0)
        routers = t.routers
        assert all(p.dtype == torch.bfloat16 for p in routers.values())
        assert set(t.params.masters) == set(routers)  # exactly the non-fp32 trainable weights have masters
        for name, p in routers.items():
            assert t.params.masters[name].dtype == torch.float32
            assert torch.equal(p.detach(), t.params.masters[name].detach().to(torch.bfloat16))
        assert all(p.dtype == torch.float32 for n, p in t.model.named_parameters() if "nexus_shared_expert" in n)
        after = base_state(t.model)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == {k for k in before if k.endswith("gate.weight")}  # only the routers moved
    finally:
        t.cleanup()


def test_sfa_blends_toward_the_initial_weights(files, tmp_path):
    plain = _run(_config(files, tmp_path / "plain", max_steps=1))
    sfa = _run(_config(files, tmp_path / "sfa", max_steps=1, sfa_interval=1, sfa_alpha=0.25))
    init = sfa.anchor
    for k, v in sfa.params.values().items():
        torch.testing.assert_close(v, 0.25 * init[k] + 0.75 * plain.params.values()[k], rtol=1e-6, atol=1e-7)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(files, tmp_path):
    out = tmp_path / "nan"
    cfg = _config(files, out, learning_rate=1e30, gradient_clip_val=0, checkpoint_interval=1, max_steps=5)
    with pytest.raises(NexusError, match=r"step \d: loss is nan.*Last good checkpoint: .*checkpoint-\d"):
        _run(cfg)
    assert (out / "checkpoint-1").is_dir() and not (out / "final").exists()


def test_every_family_trains_with_a_trainable_router(family, tmp_path):
    model_dir = save_model_dir(tmp_path / "model", family)
    data = write_text_dataset(tmp_path / "data.jsonl", n=12)
    t = _run(_config((model_dir, data), tmp_path / "out", max_steps=2, freeze_router=False, router_kl_weight=0.1,
                     checkpoint_interval=1))
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert len(rows) == 2 and all(r["router_kl"] is not None and r["grad_norm"] > 0 for r in rows)
    loaded = nexus.load_model(tmp_path / "out" / "final").state_dict()
    for k, v in t.model.state_dict().items():
        assert torch.equal(loaded[k], v), k


def test_a_separate_teacher_model(files, tmp_path):
    copy = tmp_path / "teacher"
    shutil.copytree(files[0], copy)  # the same weights under another path: loaded as a second model
    t = Trainer(_config(files, tmp_path / "out", init_strategy="zero", teacher_model=str(copy)))
    t.setup()
    try:
        assert isinstance(t.teacher, ModelTeacher) and t.teacher.model is not t.model
        row = t._optimizer_step(0)
        assert row["kl"] == 0.0 and row["router_l1"] == 0.0 and row["teacher_router_entropy"] is not None
    finally:
        t.cleanup()
    t = Trainer(_config(files, tmp_path / "out2", teacher_model=str(files[0])))  # the student's own base
    t.setup()
    assert isinstance(t.teacher, SelfTeacher)
    t.cleanup()


def test_a_teacher_without_tokenizer_is_a_warning_and_a_broken_one_an_error(files, tmp_path, caplog):
    teacher = tmp_path / "teacher"
    nexus.load_model(files[0]).save_pretrained(teacher)  # the weights, no tokenizer files
    with caplog.at_level("WARNING", logger="nexus.train"):
        t = Trainer(_config(files, tmp_path / "out", teacher_model=str(teacher)))
        t.setup()
        t.cleanup()
    assert f"--teacher-model {teacher}: no tokenizer there, so only the vocabulary sizes were compared" in caplog.text
    with pytest.raises(NexusError, match=f"--model {teacher}: no tokenizer files there"):
        load_tokenizer(teacher)  # transformers alone would build an empty one from config.json
    (teacher / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(NexusError, match="--teacher-model .*: cannot load a tokenizer"):
        t = Trainer(_config(files, tmp_path / "out2", teacher_model=str(teacher)))
        try:
            t.setup()
        finally:
            t.cleanup()


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_inputs_are_clear_errors(files, tmp_path, capsys):
    model_dir, data = files
    base = ["train", "--student-model", str(model_dir), "--init-strategy", "random", "--dataset", str(data),
            "--seq-len", "32", "--max-steps", "2", "--device", "cpu"]

    other = save_model_dir(tmp_path / "other", vocab_size=80, tokenizer=make_tokenizer(80))
    err = _cli_error(base + ["--teacher-model", str(other), "--output-dir", str(tmp_path / "o1")], capsys)
    assert "error: --teacher-model" in err and "80 tokens" in err and "96" in err

    err = _cli_error([a if a != "32" else "512" for a in base] + ["--output-dir", str(tmp_path / "o2")], capsys)
    assert "--seq-len 512 is above" in err and "max_position_embeddings = 128" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = _cli_error([a if a != str(data) else str(empty) for a in base] + ["--output-dir", str(tmp_path / "o3")],
                     capsys)
    assert "no non-empty documents" in err

    busy = tmp_path / "busy"
    (busy / "checkpoint-3").mkdir(parents=True)
    (busy / "checkpoint-3" / "trainer_state.json").write_text("{}")
    err = _cli_error(base + ["--output-dir", str(busy)], capsys)
    assert "holds an interrupted run (last checkpoint: checkpoint-3)" in err
    assert f"continue it with: nexus {' '.join(base)} --output-dir {busy} --resume-from-checkpoint latest" in err

    err = _cli_error(["train", "--student-model", str(model_dir), "--dataset", str(data), "--output-dir",
                      str(tmp_path / "o4")], capsys)
    assert "--init-strategy" in err
    err = _cli_error(base + ["--warmup-ratio", "1.5", "--output-dir", str(tmp_path / "o5")], capsys)
    assert "--warmup-ratio must be in [0, 1)" in err
    err = _cli_error(base + ["--freeze-router", "--bias-freeze-ratio", "0.3", "--output-dir", str(tmp_path / "o6")],
                     capsys)
    assert "--bias-freeze-ratio" in err
