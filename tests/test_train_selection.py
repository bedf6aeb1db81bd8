"""`nexus train --general-eval-dataset`: the general-text CE change against the frozen base (checked against
transformers' own forward of the base and of each saved adapter), and best/ = the lowest eval CE under
--max-general-increase, across a resume too."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import nexus
from nexus.data import load_tokenizer
from nexus.errors import NexusError
from nexus.stream import DataSpec, SequenceStream, build_sequences
from nexus.train.config import TrainConfig
from nexus.train.metrics import read_metrics
from nexus.train.recipe import Trainer
from nexus.train.selection import GeneralSelection, read_best
from tiny import save_model_dir, train_in_process, write_text_dataset, write_word_dataset
from tiny import single_thread  # noqa: F401  (autouse: one thread per test process)

EVALS = [0, 2, 4, 6, 8]  # step 0 (the initialization) and every --eval-every 2 of --max-steps 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection")
    general = write_word_dataset(root / "general.jsonl", n=11, seed=3)  # no pattern
    return save_model_dir(root / "model"), write_text_dataset(root / "data.jsonl", n=24), general


def _config(files, out, **kw):
    model_dir, data, general = files
    cfg = dict(student_model=str(model_dir), dataset=str(data), output_dir=str(out), seq_len=32, batch_size=2,
               max_steps=8, learning_rate=3e-2, init_strategy="random", checkpoint_interval=2, device="cpu",
               eval_dataset=str(data), eval_every=2, general_eval_dataset=str(general))
    cfg.update(kw)
    return TrainConfig(**cfg)


def _eval_rows(out):
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "eval_ce" in r}


def _selection(out):
    return json.loads((out / "best" / "trainer_state.json").read_text())["selection"]


def _same_adapter(a, b) -> bool:
    x, y = load_file(str(a / "nexus_adapter.safetensors")), load_file(str(b / "nexus_adapter.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _expected_best(rows, limit):
    under = [r for r in rows.values() if r["eval_general_change"] < limit]
    return min(under, key=lambda r: (r["eval_ce"], r["step"]))["step"] if under else None


def _reference_ce(model, seqs) -> float:
    """Mean next-token CE of a transformers model's own logits over every target of `seqs`."""
    total, n = 0.0, 0
    stream = SequenceStream(seqs, shuffle=False)
    with torch.no_grad():
        for i in range(len(seqs)):
            ids, mask = stream.batch([i])
            logits = model(input_ids=ids, attention_mask=mask).logits[0, :-1].double()
            keep = (mask[0, :-1] * mask[0, 1:]).bool()
            total += torch.nn.functional.cross_entropy(logits[keep], ids[0, 1:][keep], reduction="sum").item()
            n += int(keep.sum())
    return total / n


@pytest.fixture(scope="module")
def unlimited(files, tmp_path_factory):
    """The run with no binding limit: its rows are the candidates every other run here is checked against."""
    out = tmp_path_factory.mktemp("unlimited") / "out"
    train_in_process(_config(files, out, max_general_increase=1e6))
    return out


def test_general_change_is_the_ce_change_against_the_base_as_transformers_computes_them(files, unlimited):
    model_dir, _, general = files
    rows = _eval_rows(unlimited)
    assert sorted(rows) == EVALS
    assert set(read_metrics(unlimited / "metrics.jsonl")[0]) == {"step", "eval_ce", "eval_kl", "eval_loss",
                                                                 "eval_general_ce", "eval_general_change"}
    seqs = build_sequences(DataSpec(str(general), seq_len=32), load_tokenizer(model_dir))
    base = _reference_ce(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), seqs)
    assert _selection(unlimited)["general_base_ce"] == pytest.approx(base, rel=1e-6)
    for step in EVALS[1:]:
        adapter = unlimited / (f"checkpoint-{step}" if step < 8 else "final")
        ce = _reference_ce(nexus.load_model(adapter).eval(), seqs)
        assert rows[step]["eval_general_ce"] == pytest.approx(ce, rel=1e-6), step
        assert rows[step]["eval_general_change"] == pytest.approx(100 * (ce / base - 1), abs=1e-4), step
    assert len({round(r["eval_general_change"], 6) for r in rows.values()}) == len(EVALS)  # it moves with training


def test_base_ce_after_a_resume_with_trained_routers_is_the_base_s(files, tmp_path):
    """The routers trained before the checkpoint are swapped back to the base's for the base's general CE."""
    model_dir, _, general = files
    seqs = build_sequences(DataSpec(str(general), seq_len=32), load_tokenizer(model_dir))
    base = _reference_ce(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), seqs)
    kw = dict(max_steps=4, freeze_router=False, bias_freeze_ratio=1.0)
    train_in_process(_config(files, tmp_path / "out", **kw), steps=2)
    routers = {k: v for k, v in load_file(str(tmp_path / "out" / "checkpoint-2" / "nexus_adapter.safetensors")).items()
               if "nexus_shared_expert" not in k}
    assert routers and not all(torch.equal(v, nexus.load_model(model_dir).state_dict()[k]) for k, v in routers.items())
    t = train_in_process(_config(files, tmp_path / "out", resume_from_checkpoint="latest", **kw))
    assert t.step == 4 and t.selection.base_ce == pytest.approx(base, rel=1e-6)


def test_best_is_the_lowest_eval_ce_under_the_limit(files, unlimited, tmp_path):
    rows = _eval_rows(unlimited)
    top = _expected_best(rows, 1e6)
    assert _selection(unlimited)["step"] == top
    # A limit right at the unconstrained winner's change: "under" excludes it, and the rule picks another step.
    limit = rows[top]["eval_general_change"]
    assert limit > 0, "the fixture's training no longer raises the general CE; pick other data"
    expected = _expected_best(rows, limit)
    assert expected not in (None, top)
    out = tmp_path / "limited"
    train_in_process(_config(files, out, max_general_increase=limit))
    assert {s: r["eval_ce"] for s, r in _eval_rows(out).items()} == {s: r["eval_ce"] for s, r in rows.items()}
    sel = _selection(out)
    assert sel["step"] == expected and sel["eval_ce"] == rows[expected]["eval_ce"]
    assert sel["max_general_increase"] == limit and sel["eval_general_change"] < limit
    # best/ is that step's adapter (a checkpoint was written at every evaluation step) and loads as one
    source = out / (f"checkpoint-{expected}" if 0 < expected < 8 else "final")
    if expected > 0:
        assert _same_adapter(out / "best", source)
    nexus.load_model(out / "best")
    assert not (out / "best" / "optimizer.pt").exists()


def test_no_best_when_nothing_is_under_the_limit(files, tmp_path, caplog):
    # a wide gated random init: its step 0 already raises the general CE (the default one here lowers it a little)
    short = dict(max_steps=2, width_multiplier=4.0, gate=20.0)
    train_in_process(_config(files, tmp_path / "probe", max_general_increase=1e6, **short))
    lowest = min(r["eval_general_change"] for r in _eval_rows(tmp_path / "probe").values())
    assert lowest > 0, "the init no longer raises the general CE at step 0; pick another"
    with caplog.at_level("WARNING", logger="nexus.train"):
        train_in_process(_config(files, tmp_path / "out", max_general_increase=lowest, **short))
    assert not (tmp_path / "out" / "best").exists() and (tmp_path / "out" / "final").is_dir()
    assert "no best/ was written" in caplog.text


def test_selection_rule_at_the_limit_and_on_ties(tmp_path):
    key = {"max_general_increase": 5.0, "eval_data_fingerprint": "e", "general_data_fingerprint": "g"}
    sel = GeneralSelection(tmp_path, key, base_ce=2.0)
    taken = [step for step, ce, change in [(0, 3.0, 5.0), (1, 2.9, 4.0), (2, 2.9, 1.0), (3, 2.5, 6.0), (4, 2.8, -1.0)]
             if sel.consider({"step": step, "eval_ce": ce, "eval_general_ce": 2.0 * (1 + change / 100),
                              "eval_general_change": change})]
    assert taken == [1, 4]  # 0: at the limit is not under; 2: a tie keeps the earlier; 3: over the limit
    assert sel.best == {"step": 4, "eval_ce": 2.8, "eval_general_ce": 2.0 * 0.99, "eval_general_change": -1.0,
                        "general_base_ce": 2.0, **key}
    assert sel.change(2.1) == pytest.approx(5.0)


def test_resume_keeps_best_selected_before_the_interruption(files, unlimited, tmp_path, caplog):
    rows = _eval_rows(unlimited)
    limit = rows[_expected_best(rows, 1e6)]["eval_general_change"]
    expected = _expected_best(rows, limit)
    ref = tmp_path / "ref"
    train_in_process(_config(files, ref, max_general_increase=limit))
    victim = tmp_path / "victim"
    train_in_process(_config(files, victim, max_general_increase=limit), steps=6)  # best/ may hold a step after checkpoint-4
    shutil.rmtree(victim / "checkpoint-6")
    train_in_process(_config(files, victim, max_general_increase=limit, resume_from_checkpoint="latest"))
    assert _selection(victim) == _selection(ref) and _selection(victim)["step"] == expected
    assert _same_adapter(victim / "best", ref / "best")
    assert [r.get("eval_ce") for r in read_metrics(victim / "metrics.jsonl")] == \
        [r.get("eval_ce") for r in read_metrics(ref / "metrics.jsonl")]

    # Resumed elsewhere without best/: said, and the selection goes on from the checkpoint.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(ref / "checkpoint-4", other / "checkpoint-4")
    with caplog.at_level("WARNING", logger="nexus.train"):
        train_in_process(_config(files, other, max_general_increase=limit, resume_from_checkpoint="latest"))
    assert "is not in" in caplog.text and _selection(other)["step"] > 4

    # Another limit than best/ was selected with: refused by name.
    with pytest.raises(NexusError, match="--max-general-increase"):
        train_in_process(_config(files, victim, max_general_increase=limit / 2, resume_from_checkpoint="latest",
                     max_steps=10))


def test_bad_flags_are_named(files, tmp_path):
    with pytest.raises(NexusError, match="--general-eval-dataset needs --eval-dataset"):
        Trainer(_config(files, tmp_path / "o", eval_dataset=None))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(NexusError, match="--max-general-increase must be a positive"):
            Trainer(_config(files, tmp_path / "o", max_general_increase=bad))


def test_a_foreign_best_is_refused_by_name(tmp_path):
    key = {"max_general_increase": 5.0, "eval_data_fingerprint": "e", "general_data_fingerprint": "g"}
    assert read_best(tmp_path, key) is None
    (tmp_path / "best").mkdir()
    state = tmp_path / "best" / "trainer_state.json"
    state.write_text(json.dumps({"step": 3}))  # a final/ copied here: no selection record
    with pytest.raises(NexusError, match="not a best/ written by"):
        read_best(tmp_path, key)
    record = {"step": 3, "eval_ce": 2.5, "eval_general_change": 1.0, **key}
    state.write_text(json.dumps({"selection": record}))
    assert read_best(tmp_path, key) == record
    for name, flag in [("eval_data_fingerprint", "--eval-dataset"), ("general_data_fingerprint",
                                                                     "--general-eval-dataset")]:
        with pytest.raises(NexusError, match=f"another {flag} than"):
            read_best(tmp_path, {**key, name: "other"})
