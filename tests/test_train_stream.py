"""The data stream: deterministic, disjoint across ranks, resumable by position, packing and padding."""

import json

import numpy as np
import pytest
import torch

from nexus.errors import NexusError
from nexus.stream import DataSpec, SequenceSet, SequenceStream, StepLayout, build_sequences, trim_padding
from tiny import make_tokenizer, write_chat_dataset, write_text_dataset
from tiny import single_thread  # noqa: F401  (autouse: one thread per test process)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _seqs(n=10, length=6):
    ids = np.arange(n * length, dtype=np.int32).reshape(n, length)
    return SequenceSet(ids, np.full(n, length, dtype=np.int32), pad_id=0)


def test_positions_are_disjoint_and_ddp_reads_what_accumulation_reads():
    one = StepLayout(batch_size=2, accumulation=4, world_size=1)
    two = StepLayout(batch_size=2, accumulation=2, world_size=2)
    assert one.global_batch == two.global_batch == 8
    for step in range(3):
        a = [p for m in range(4) for p in one.positions(step, m, 0)]
        b = [p for m in range(2) for r in range(2) for p in two.positions(step, m, r)]
        assert sorted(a) == sorted(b) == list(range(step * 8, step * 8 + 8))  # no duplicates, no gaps


def test_stream_is_deterministic_and_covers_each_epoch_once():
    seqs = _seqs()
    s1, s2 = SequenceStream(seqs, seed=3), SequenceStream(seqs, seed=3)
    order = [s1.index(p) for p in range(30)]
    assert order == [s2.index(p) for p in range(30)]
    for epoch in range(3):
        assert sorted(order[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert order[:10] != order[10:20]  # a new permutation each epoch
    assert order != [SequenceStream(seqs, seed=4).index(p) for p in range(30)]
    assert [SequenceStream(seqs, shuffle=False).index(p) for p in range(12)] == list(range(10)) + [0, 1]
    ids, mask = s1.batch(range(5, 8))  # any position can be read directly: resuming needs only the step
    assert ids.tolist() == [seqs.ids[s1.index(p)].tolist() for p in range(5, 8)] and mask.all()


def test_packing_and_padding(tmp_path, tok):
    data = write_text_dataset(tmp_path / "d.jsonl", n=12)
    packed = build_sequences(DataSpec(str(data), seq_len=16), tok)
    assert (packed.lengths == 16).all()
    padded = build_sequences(DataSpec(str(data), seq_len=16, pack=False), tok)
    assert (padded.lengths <= 16).all() and (padded.lengths < 16).any()
    ids, mask = SequenceStream(padded, shuffle=False).batch(range(len(padded)))
    assert (ids[mask == 0] == tok.pad_token_id).all()
    # Both hold the same tokens (packing drops only the last partial sequence).
    total = sum(len(tok(json.loads(line)["text"])["input_ids"]) + 1 for line in data.read_text().splitlines())
    assert int(padded.lengths.sum()) == total and total - 16 < packed.ids.size <= total
    trimmed, tmask = trim_padding(ids, mask)
    assert trimmed.shape[1] == int(padded.lengths.max()) and torch.equal(tmask.sum(1), mask.sum(1))


def test_chat_records_are_rendered_with_the_chat_template(tmp_path, tok):
    data = write_chat_dataset(tmp_path / "chat.jsonl", n=4)
    seqs = build_sequences(DataSpec(str(data), seq_len=256, pack=False), tok)
    first = json.loads(data.read_text().splitlines()[0])["messages"]
    expected = tok(tok.apply_chat_template(first, tokenize=False), add_special_tokens=False)["input_ids"]
    assert seqs.ids[0, :seqs.lengths[0]].tolist() == expected + [tok.eos_token_id]


def test_fingerprint_changes_with_the_data(tmp_path, tok):
    a = build_sequences(DataSpec(str(write_text_dataset(tmp_path / "a.jsonl", n=8, seed=0)), seq_len=16), tok)
    b = build_sequences(DataSpec(str(write_text_dataset(tmp_path / "b.jsonl", n=8, seed=1)), seq_len=16), tok)
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == build_sequences(DataSpec(str(tmp_path / "a.jsonl"), seq_len=16), tok).fingerprint()


def test_empty_or_too_short_dataset_is_a_clear_error(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(NexusError, match="no non-empty documents"):
        build_sequences(DataSpec(str(empty), seq_len=16), tok)
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "the cat"}) + "\n")
    with pytest.raises(NexusError, match="--seq-len 64"):
        build_sequences(DataSpec(str(short), seq_len=64), tok)
