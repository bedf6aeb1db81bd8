"""`nexus sample`: the fast greedy equals a naive reference; the command reads, selects and writes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from tiny import random_text, run_cli, run_main, save_tokenizer, write_jsonl

from nexus.data import Document
from nexus.stats.sample import draw_candidates
from nexus.stats.sampling import RTOL, build_pool, kl_to_pool, select


def naive_greedy(cands: list[list[int]], target: int, objective: str) -> list[int]:
    """Reference: every step scores every remaining candidate from scratch; lowest index wins ties."""
    size = max(t for c in cands for t in c) + 1
    pool = np.zeros(size)
    for c in cands:
        np.add.at(pool, c, 1)
    p = pool / pool.sum()
    selected, covered, order, total = np.zeros(size), set(), [], 0
    remaining = list(range(len(cands)))
    while remaining and total < target:
        scores = []
        for i in remaining:
            if objective == "coverage":
                scores.append(-len(set(cands[i]) - covered))
            else:
                s = selected.copy()
                np.add.at(s, cands[i], 1)
                q = s / s.sum()
                nz = q > 0
                scores.append(float(np.sum(q[nz] * np.log(q[nz] / p[nz]))))
        scores = np.array(scores)
        best = scores.min()
        tol = 0.0 if objective == "coverage" else RTOL * max(1.0, abs(best))
        j = remaining[int(np.flatnonzero(scores <= best + tol)[0])]
        order.append(j)
        remaining.remove(j)
        total += len(cands[j])
        covered |= set(cands[j])
        np.add.at(selected, cands[j], 1)
    return order


def random_pool(rng: np.random.Generator, with_duplicates: bool) -> list[list[int]]:
    n, vocab = int(rng.integers(5, 40)), int(rng.integers(5, 60))
    zipf = 1 / np.arange(1, vocab + 1) ** 1.1
    cands = [list(rng.choice(vocab, size=int(rng.integers(1, 30)), p=zipf / zipf.sum()) + 7) for _ in range(n)]
    if with_duplicates:  # exact ties: the same multiset of tokens at a higher index
        cands += [list(cands[0]), list(reversed(cands[1])), list(cands[0])]
    return cands


@pytest.mark.parametrize("objective", ["coverage", "distribution"])
def test_greedy_equals_naive_reference(objective):
    rng = np.random.default_rng(1)
    for trial in range(25):
        cands = random_pool(rng, with_duplicates=trial % 2 == 0)
        target = int(sum(map(len, cands)) * rng.uniform(0.1, 1.2))
        fast = select(build_pool(cands), target, objective).order
        assert fast == naive_greedy(cands, target, objective), f"trial {trial}"


@pytest.mark.parametrize("objective", ["coverage", "distribution"])
def test_ties_go_to_lowest_index(objective):
    cands = [[5, 6], [7, 8], [5, 6], [7, 8]]
    order = select(build_pool(cands), 100, objective).order
    assert sorted(order) == [0, 1, 2, 3]
    assert order[0] == 0 and order.index(0) < order.index(2) and order.index(1) < order.index(3)


def test_selection_summary_and_stop_rule():
    cands = [[1, 1, 1, 1], [2, 3], [1, 2, 3, 4], [4, 4]]
    pool = build_pool(cands)
    assert list(pool.vocab) == [1, 2, 3, 4] and list(pool.pool_counts) == [5, 2, 2, 3]
    sel = select(pool, 4, "distribution")
    # The pool unigram is (5, 2, 2, 3)/12; candidate 2 (1, 1, 1, 1)/4 is closest, and alone reaches 4 tokens.
    assert sel.order == [2] and sel.tokens == 4 and sel.coverage == 1.0
    assert sel.kl == pytest.approx(kl_to_pool(pool, np.array([1, 1, 1, 1])))
    everything = select(pool, 10**9, "coverage")
    assert sorted(everything.order) == [0, 1, 2, 3] and everything.kl == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tok"))


def test_sample_command(tmp_path, tokenizer_dir):
    rng = random.Random(0)
    records = [{"text": random_text(rng)} for _ in range(60)]
    records.append({"messages": [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on"}]})
    data = write_jsonl(tmp_path / "data" / "a.jsonl", records)
    (tmp_path / "data" / "b.txt").write_text(" ".join(["dog"] * 50))
    out = tmp_path / "sample.jsonl"
    r = run_cli("sample", "--dataset", data.parent, "--tokenizer", tokenizer_dir, "--output", out,
                "--target-tokens", 200, "--seq-len", 12, "--workers", 2)
    assert r.returncode == 0, r.stderr
    assert "sampled" in r.stdout and "KL(selected || pool)" in r.stdout and "coverage" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 200 <= sum(row["tokens"] for row in rows) < 200 + 12
    assert all(1 <= row["tokens"] <= 12 and len(row["text"].split()) <= 12 for row in rows)
    assert len({row["source_index"] for row in rows}) == len(rows)
    for row in rows:  # truncated texts were cut at a token boundary
        if row["source"].endswith("b.txt:0"):
            assert row["text"] == " ".join(["dog"] * 12)
    # The same run in process gives the same file; the pool running out is said, not hidden.
    again = tmp_path / "again.jsonl"
    r = run_main("sample", "--dataset", data.parent, "--tokenizer", tokenizer_dir, "--output", again,
                 "--target-tokens", 200, "--seq-len", 12)
    assert r.returncode == 0 and again.read_text() == out.read_text()
    r = run_main("sample", "--dataset", data.parent, "--tokenizer", tokenizer_dir, "--output", again,
                 "--objective", "coverage", "--target-tokens", 10**6, "--overwrite")
    assert r.returncode == 0 and "pool exhausted" in r.stdout and len(again.read_text().splitlines()) == 62


def test_candidates_are_a_seeded_uniform_draw():
    docs = [Document(f"w{i}", f"x:{i}") for i in range(100)]
    picks = [[i for i, _ in draw_candidates(iter(docs), 10, seed)] for seed in (0, 0, 1)]
    assert picks[0] == picks[1] != picks[2] and picks[0] == sorted(picks[0]) and len(set(picks[2])) == 10
    assert [i for i, _ in draw_candidates(iter(docs[:5]), 10, 0)] == [0, 1, 2, 3, 4]


def test_sample_chat_records_use_the_chat_template(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "cat"}]}])
    out = tmp_path / "s.jsonl"
    r = run_main("sample", "--dataset", data, "--tokenizer", tokenizer_dir, "--output", out, "--target-tokens", 5)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["text"].strip() == "<|user|> cat <|end|>"


@pytest.mark.parametrize("case", ["empty", "missing_field", "bad_flag"])
def test_sample_bad_inputs(tmp_path, tokenizer_dir, case):
    data = tmp_path / "d.jsonl"
    extra = []
    if case == "empty":
        data.write_text("\n")
    else:
        write_jsonl(data, [{"body": "the cat"}])
        if case == "bad_flag":
            extra = ["--text-field", "body", "--target-tokens", "0"]
    out = tmp_path / "out.jsonl"
    r = run_main("sample", "--dataset", data, "--tokenizer", tokenizer_dir, "--output", out, *extra)
    assert r.returncode == 2
    expected = {"empty": "no non-empty documents", "missing_field": "has no field 'text'",
                "bad_flag": "--target-tokens must be at least 1"}[case]
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == [data]
