"""Method study on the bundled demo MoE: init strategies, other fine-tuning methods, sensitivity.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 5 python benchmarks/study.py --questions 1 --steps 40 --seeds 0 1 2
    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 5 python benchmarks/study.py --questions 3 --steps 40 --seeds 0
    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 5 python benchmarks/study.py --questions 2 --steps 40 --seeds 0 1 2
    PYTHONPATH=src python benchmarks/study.py --report          # docs/study.md + docs/study/*.png from the JSON

Specialization to the demo model's held-out domain (`email` + `http`): every run trains for --steps
optimizer steps of --batch sequences × --seq-len tokens of domain_train (the Trainer's data order for
the seed), loss CE + kl_weight × T² × KL(base ‖ model), T = 2, lr 1e-3 with 10 % warmup, and is scored
before and after on the first --eval-num packed --seq-len sequences of domain_eval and general_eval
(nexus.validate.metrics.evaluate against the frozen base). Router statistics: `nexus collect` once on
domain_train (--stats-tokens tokens), analyzed (nexus.stats.analyze) into each selection.

  1  init strategies (NEXUS, frozen router): zero, random, uniform average of all experts,
     pca_top8 equal / importance weights, frequency_top8, aligned_top8, concat_top8
  2  NEXUS frozen vs trainable router, PEFT LoRA (attention + experts, rank matched to NEXUS's
     parameter count), ESFT-style (most-used routed experts per layer unfrozen by a gradient mask);
     each run in a fresh process, so ru_maxrss is that run's peak RSS
  3  sensitivity around pca_top8 / importance: width 1×, 2×, 4×; KL weight 0, 1, 4; top-K 4, 8, 16

Each question writes docs/study/results_qN.json (raw results); every invocation then rewrites
docs/study.md and the plots from all result files present.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_lib as L  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "study"
K = 8  # top-K of the reference NEXUS configuration (the demo config's pca_top8)


def setup(args):
    work = Path(args.work)
    data = L.write_data(work)
    stats = L.router_stats(work, data, args.stats_tokens)
    sel = {f"pca_top{k}_{w}": L.selection(stats, work, f"pca_top{k}_{w}", k, "pca", w)
           for k in (4, 8, 16) for w in ("equal", "importance")}
    sel["frequency_top8"] = L.selection(stats, work, "frequency_top8", K, "frequency", "importance")
    sel["uniform_all"] = L.uniform_selection(sel["pca_top8_importance"], work)
    return work, data, stats, sel


def summarize(runs: list[dict]) -> dict:
    """Mean and std (over seeds) of every start/end metric, plus medians of cost figures."""
    out = {}
    for when in ("start", "end"):
        for key in runs[0][when]:
            vals = [r[when][key] for r in runs]
            out[f"{when}_{key}"] = [statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]
    for key in ("trainable", "step_s", "rss_mib", "rss_before_mib"):
        if key in runs[0]:
            out[key] = statistics.median(r[key] for r in runs)
    out["seeds"] = len(runs)
    return out


def q1(args, work, data, stats, sel, ev):
    configs = [("zero", "zero", None), ("random", "random", None),
               ("uniform_all32", f"pca_top{32}", sel["uniform_all"]),
               ("pca_top8_equal", "pca_top8", sel["pca_top8_equal"]),
               ("pca_top8_importance", "pca_top8", sel["pca_top8_importance"]),
               ("frequency_top8", "frequency_top8", sel["frequency_top8"]),
               ("aligned_top8", "aligned_top8", sel["pca_top8_importance"]),
               ("concat_top8", "concat_top8", sel["pca_top8_importance"])]
    results = {}
    for name, strategy, path in configs:
        runs = []
        for seed in args.seeds:
            t0 = time.time()
            ad = L.adapter(work, name, strategy, path, seed)
            runs.append(L.run_nexus(ad, data, ev, work, f"q1-{name}-s{seed}", args.steps, seed,
                                    batch=args.batch, seq_len=args.seq_len))
            print(f"q1 {name} seed {seed}: domain ppl {runs[-1]['start']['domain_ppl']:.2f} -> "
                  f"{runs[-1]['end']['domain_ppl']:.2f} ({time.time() - t0:.0f}s)", flush=True)
        results[name] = {"strategy": strategy, "runs": runs, "summary": summarize(runs)}
    return results


def q2(args, work, data, stats, sel, ev):
    common = dict(data=data, root=str(work), eval_num=args.eval_num, eval_len=args.seq_len, steps=args.steps,
                  batch=args.batch, seq_len=args.seq_len)
    ad = L.adapter(work, "pca_top8_importance", "pca_top8", sel["pca_top8_importance"], 0)
    n_nexus = None
    methods = [("nexus_frozen_router", "nexus", dict(adapter_dir=ad, train_router=False)),
               ("nexus_trainable_router", "nexus", dict(adapter_dir=ad, train_router=True)),
               ("lora", "lora", {}),
               ("esft_top1", "esft", dict(per_layer=1, stats_path=str(stats))),
               ("esft_top2", "esft", dict(per_layer=2, stats_path=str(stats)))]
    results = {}
    for name, fn, kw in methods:
        runs = []
        for seed in args.seeds:
            t0 = time.time()
            if fn == "nexus":
                kw = {**kw, "tag": f"q2-{name}-s{seed}"}
            if fn == "lora":
                kw = dict(rank=L.lora_rank_for(n_nexus), stats_path=str(stats))
            runs.append(L.isolated(fn, {**common, **kw, "seed": seed}))
            print(f"q2 {name} seed {seed}: domain ppl {runs[-1]['start']['domain_ppl']:.2f} -> "
                  f"{runs[-1]['end']['domain_ppl']:.2f}, {runs[-1]['trainable']:,} params "
                  f"({time.time() - t0:.0f}s)", flush=True)
        n_nexus = n_nexus or runs[0]["trainable"]
        results[name] = {"runs": runs, "summary": summarize(runs), **({"rank": runs[0]["rank"]} if fn == "lora" else {})}
    return results


def q3(args, work, data, stats, sel, ev):
    ref = dict(width=1, kl=1.0, k=8)
    points = [("width", 1), ("width", 2), ("width", 4), ("kl", 0.0), ("kl", 1.0), ("kl", 4.0),
              ("k", 4), ("k", 8), ("k", 16)]
    done, results = {}, {}
    for knob, value in points:
        cfg = {**ref, knob: value}
        key = (cfg["width"], cfg["kl"], cfg["k"])
        if key not in done:
            runs = []
            for seed in args.seeds:
                t0 = time.time()
                name = f"pca_top{cfg['k']}_importance"
                ad = L.adapter(work, f"{name}-w{cfg['width']}", f"pca_top{cfg['k']}", sel[name], seed, cfg["width"])
                runs.append(L.run_nexus(ad, data, ev, work, f"q3-{knob}{value}-s{seed}", args.steps, seed,
                                        kl_weight=cfg["kl"], batch=args.batch, seq_len=args.seq_len))
                print(f"q3 {knob}={value} seed {seed}: domain ppl {runs[-1]['start']['domain_ppl']:.2f} -> "
                      f"{runs[-1]['end']['domain_ppl']:.2f} ({time.time() - t0:.0f}s)", flush=True)
            done[key] = {"config": cfg, "runs": runs, "summary": summarize(runs)}
        results[f"{knob}={value}"] = {"knob": knob, "value": value, **done[key]}
    return results


QUESTIONS = {1: q1, 2: q2, 3: q3}


def _report():
    import study_report  # imported late: a long run writes its JSON even if the report code changes meanwhile

    return study_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (data order, random init)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, train and eval (default 128)")
    p.add_argument("--eval-num", type=int, default=24, help="evaluation sequences per split (default 24)")
    p.add_argument("--stats-tokens", type=int, default=40000, help="router-statistics tokens (default 40000)")
    p.add_argument("--work", default=str(ROOT / "study_out"), help="work directory (adapters, runs, data)")
    p.add_argument("--report", action="store_true", help="only rewrite docs/study.md and the plots")
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    DOCS.mkdir(parents=True, exist_ok=True)
    if not args.report:
        work, data, stats, sel = setup(args)
        ev = L.Evaluator(data, args.eval_num, args.seq_len)
        for q in args.questions:
            t0 = time.time()
            res = QUESTIONS[q](args, work, data, stats, sel, ev)
            meta = {"question": q, "args": {k: v for k, v in vars(args).items() if k != "work"},
                    "seconds": time.time() - t0, "torch": torch.__version__, "threads": torch.get_num_threads()}
            (DOCS / f"results_q{q}.json").write_text(json.dumps({"meta": meta, "results": res}, indent=1))
            print(_report().table(q, res))
    path = _report().write_report(DOCS, ROOT / "docs" / "study.md")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
