"""The testbed's corpus rule and routing measure (scripts/testbed_data.py, scripts/testbed_routing.py) on
made-up inputs: no model, no pretraining."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import testbed_data  # noqa: E402
import testbed_routing as tr  # noqa: E402


def test_tv_distance_by_hand():
    p = [0.5, 0.5, 0.0, 0.0]
    q = [0.25, 0.25, 0.25, 0.25]
    assert tr.tv_distance(p, q) == pytest.approx(0.5)  # 1/2 (0.25 + 0.25 + 0.25 + 0.25)
    assert tr.tv_distance(p, p) == 0.0
    assert tr.tv_distance([1, 0], [0, 1]) == 1.0
    with pytest.raises(ValueError):
        tr.tv_distance([1.0], [0.5, 0.5])


def test_shares_top_experts_and_overlap():
    assert tr.shares([1, 3, 0, 4]) == [0.125, 0.375, 0.0, 0.5]
    assert tr.shares([0, 0]) == [0.0, 0.0]
    assert tr.top_experts([0.1, 0.4, 0.1, 0.4], 3) == [1, 3, 0]  # ties go to the lower index
    # 12 experts; domain favours 0..5, general 4..11: their top-4s share experts 4 and 5 only
    dom = [10, 10, 10, 10, 20, 20, 1, 1, 1, 1, 1, 1]
    gen = [1, 1, 1, 1, 9, 9, 5, 5, 5, 5, 5, 5]
    assert tr.top_experts(dom, 4) == [4, 5, 0, 1]
    assert tr.top_experts(gen, 4) == [4, 5, 6, 7]
    assert tr.top_overlap(dom, gen, 4) == 2


def test_compare_on_made_up_router_counts():
    # 2 layers x 16 experts. Layer 0: the domain uses experts 0-7 only, general text all 16 evenly
    # -> TV = 1/2 (8 x (1/8 - 1/16) + 8 x 1/16) = 0.5. Layer 1: identical routing -> TV 0, overlap 8.
    dom = [[100] * 8 + [0] * 8, [5] * 16]
    gen = [[50] * 16, [7] * 16]
    r = tr.compare(dom, gen, n=8)
    assert r["layers"][0]["tv"] == pytest.approx(0.5)
    assert r["layers"][1]["tv"] == pytest.approx(0.0)
    assert r["layers"][0]["domain_top"] == list(range(8))
    assert r["layers"][0]["top_overlap"] == 8  # general's ties resolve to experts 0-7 as well
    assert r["mean_tv"] == pytest.approx(0.25)
    assert r["max_top_overlap"] == 8
    # least-used share over both splits pooled: layer 0 experts 8-15 get 50 / (800 + 800)
    assert r["layers"][0]["min_share_all"] == pytest.approx(50 / 1600)
    assert r["layers"][0]["min_share_domain"] == 0.0
    # general favouring the other half: disjoint top-8s
    r = tr.compare([[1] * 8 + [0] * 8], [[0] * 8 + [1] * 8])
    assert r["layers"][0]["tv"] == pytest.approx(1.0) and r["layers"][0]["top_overlap"] == 0


def test_share_of_routing_through_selected_experts(tmp_path):
    assert tr.selected_share([[6, 2, 2, 0], [0, 0, 5, 5]], {0: [0], 1: [1, 2]}) == [0.6, 0.5]
    # a measure result: the held-out domain and general text pooled from two sets, 2 layers x 4 experts
    result = {"num_experts": 4, "top_k": 2, "held_out": "man", "general": ["c", "perl"],
              "counts": {"man": [[6, 2, 2, 0], [1, 1, 1, 1]], "c": [[1, 1, 4, 4], [0, 2, 2, 0]],
                         "perl": [[1, 1, 0, 0], [2, 0, 0, 2]]}}
    setup = tmp_path / "setup.json"  # as benchmarks/study.py writes it: named ESFT selections
    setup.write_text(json.dumps({"nexus_params": 1, "esft": {"esft": {"0": [0, 1], "1": [0]},
                                                              "esft-matched": {"0": [0], "1": [3]}}}))
    figs = tr.selection_figures(result, tr.load_selections(setup))
    assert figs["esft"]["domain"] == pytest.approx([0.8, 0.25])
    assert figs["esft"]["general"] == pytest.approx([4 / 12, 2 / 8])  # pooled: [2, 2, 4, 4], [2, 2, 2, 2]
    assert figs["esft-matched"]["mean_general"] == pytest.approx((2 / 12 + 2 / 8) / 2)
    result["selected"] = figs
    assert "| **mean** | | **0.525** | **0.292** |" in tr.render_selected(result)
    plain = tmp_path / "mine.json"
    plain.write_text(json.dumps({"0": [3], "1": [2]}))
    assert tr.load_selections(plain) == {"mine": {0: [3], 1: [2]}}
    with pytest.raises(SystemExit, match="layers \\[0\\]"):
        tr.selection_figures(result, {"short": {0: [1]}})
    with pytest.raises(SystemExit, match="--selected .*bad.json: expected a study setup.json"):
        (tmp_path / "bad.json").write_text("[1, 2]")
        tr.load_selections(tmp_path / "bad.json")


def test_truncate_at_line_end():
    text = "abc\ndef\nghi\n"
    assert testbed_data.truncate(text, 100) == text
    assert testbed_data.truncate(text, 9) == "abc\ndef\n"
    assert testbed_data.truncate("é" * 10, 5) == "éé"  # no line end: cut at a character boundary


def test_read_text_gzip_and_redirects(tmp_path):
    (tmp_path / "a.1.gz").write_bytes(gzip.compress(b".TH A 1\nhello\n"))
    (tmp_path / "b.1.gz").write_bytes(gzip.compress(b".so man1/a.1\n"))
    (tmp_path / "c.h").write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "d.h").write_text("  \n")
    assert testbed_data.read_text(str(tmp_path / "a.1.gz")) == ".TH A 1\nhello\n"
    for name in ("b.1.gz", "c.h", "d.h", "missing.h"):
        assert testbed_data.read_text(str(tmp_path / name)) is None


def _fake_read(path):
    return None if path.endswith("skip") else "x" * 10 + "\n"  # 11 bytes per file


def test_deal_is_deterministic_and_disjoint():
    paths = [f"/src/f{i:03d}.h" for i in range(60)] + ["/src/zz.skip"]
    caps = (("eval", 30), ("train", 200))
    a = testbed_data.deal("c", paths, caps, read=_fake_read)
    b = testbed_data.deal("c", list(reversed(paths)), caps, read=_fake_read)
    assert a == b  # independent of the listing order
    ev, trn = [p for p, _ in a["eval"]], [p for p, _ in a["train"]]
    assert len(ev) == 3 and len(trn) == 19  # each split fills until it holds its cap (3 x 11 >= 30)
    assert not set(ev) & set(trn)
    order = sorted(paths, key=lambda p: testbed_data.hash_key("c", p))
    assert ev == [p for p in order if not p.endswith("skip")][:3]  # eval = the first files in hash order
    # another domain name gives another order (the key is sha256 of "domain:path")
    other = testbed_data.deal("perl", paths, caps, read=_fake_read)
    assert [p for p, _ in other["eval"]] != ev
    # a larger train cap keeps the eval split and extends train
    more = testbed_data.deal("c", paths, (("eval", 30), ("train", 10_000)), read=_fake_read)
    assert [p for p, _ in more["eval"]] == ev and len(more["train"]) == 57


def test_general_val_is_dealt_last_and_moves_no_other_file():
    paths = [f"/src/f{i:03d}.h" for i in range(60)]
    before = testbed_data.deal("c", paths, (("eval", 30), ("train", 200)), read=_fake_read)
    after = testbed_data.deal("c", paths, (("eval", 30), ("train", 200), ("val", 50)), read=_fake_read)
    assert after["eval"] == before["eval"] and after["train"] == before["train"]
    val = [p for p, _ in after["val"]]
    assert len(val) == 5 and not set(val) & {p for p, _ in before["eval"] + before["train"]}
    for d in testbed_data.GENERAL_DOMAINS:  # the testbed's rule: every general domain ends with general_val
        assert testbed_data.CAPS[d][-1] == ("general_val", testbed_data.GENERAL_VAL_BYTES)
    assert all(split != "general_val" for split, _ in testbed_data.CAPS[testbed_data.HELD_OUT])
    # the corpus sha256 covers the five splits builds recorded before general_val existed
    assert testbed_data.DIGEST_SPLITS == ("general_train", "general_eval", "domain_pretrain", "domain_train",
                                          "domain_eval")


def test_hash_key_is_stable():
    # sha256("c:/usr/include/stdio.h"): the same on every machine and every run
    assert testbed_data.hash_key("c", "/usr/include/stdio.h").hex()[:16] == \
        __import__("hashlib").sha256(b"c:/usr/include/stdio.h").hexdigest()[:16]
    assert set(testbed_data.CAPS) == set(testbed_data.DOMAINS)
    assert testbed_data.HELD_OUT not in testbed_data.GENERAL_DOMAINS


def test_family_caps_keep_one_package_from_filling_a_domain():
    assert testbed_data.family("man", "/usr/share/man/man1/gcloud_compute_ssh.1.gz") == "gcloud"
    assert testbed_data.family("man", "/usr/share/man/man1/git-log.1.gz") == "git"
    assert testbed_data.family("man", "/usr/share/man/man3/SSL_new.3ssl.gz") == "ssl"
    assert testbed_data.family("c", "/usr/include/linux/if.h") == "/usr/include/linux"
    assert testbed_data.family("c", "/usr/include/stdio.h") == "/usr/include/stdio.h"
    paths = [f"/m/gcloud_{i}.1.gz" for i in range(50)] + [f"/m/tool{i}.1.gz" for i in range(10)]
    fam = lambda p: testbed_data.family("man", p)  # noqa: E731
    out = testbed_data.deal("man", paths, (("eval", 10_000),), read=_fake_read, family_of=fam, family_cap=3)
    picked = [p for p, _ in out["eval"]]
    assert sum(p.startswith("/m/gcloud") for p in picked) == 3 and len(picked) == 13
