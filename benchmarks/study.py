"""Pareto study: NEXUS against other fine-tuning methods, each at several learning rates and paired seeds,
trained until the domain loss plateaus, scored on the full held-out splits.

Smoke test of the machinery (bundled demo model, tiny budgets; writes under /tmp only):

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 5 python benchmarks/study.py --smoke \
        --work /tmp/nexus-study-smoke --out /tmp/nexus-study-smoke/report

Full study on the specializing testbed (TESTBED = the model directory of scripts/pretrain_testbed.py,
DATA = its data directory; the results land in docs/study/results.jsonl, the report in docs/study/ and
docs/study.md):

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 5 python benchmarks/study.py --model TESTBED \
        --domain-train DATA/domain_train.jsonl --domain-eval DATA/domain_eval.jsonl \
        --general-eval DATA/general_eval.jsonl --lrs 3e-4 1e-3 3e-3 1e-2 --seeds 0 1 2 \
        --max-steps 2000 --trend-window 12 --work /tmp/nexus-study --out docs/study --doc docs/study.md

Cost, measured on the demo model with one thread (2-core machine, lightly loaded): ~0.5 s per training step
(8 × 128 tokens), ~2.3 s per validation evaluation (the 10 % slice, ~19k tokens), ~45 s per full scoring
(~33k domain_eval + ~117k general_eval tokens, model and base), ~10 s to start a run's process; a run takes
about 0.6 s × steps + 55 s. The default grid (10 methods × 4 lrs × 3 seeds = 120 runs, plus 13 step-0
scorings) is then ~6 h of CPU time if runs plateau near 200 steps, ~12 h near 500, ~41 h if all reach
--max-steps 2000; on the testbed at 3e-3 the validation loss was still falling 0.02-0.11 nats per 300 steps
after 600-1400 steps (docs/study/plateau/), so expect the last. Runs are independent: once setup.json exists
in --work, two processes with disjoint --methods and the same --work and --out share one results file.
A model path names weights that can change (a testbed rebuilt on a machine with another instruction set
writes other weights): setup.json and every result row record the sha256 of the weights and of the data
splits; a --work prepared from others is refused, step-0 scores are reused only from rows with the same
digests, and study_report.py refuses a results file that mixes them.

Without --model and the data flags it runs on the demo model and its `nexus.demo_data` splits. A rerun
with the same --out skips every (method, lr, seed) already in results.jsonl (resumable); only the report
is rewritten with --report.

Protocol. --val-frac of domain_train's documents (the last ones) are held out as the validation slice of
the stopping rule; every method trains on the rest, in the Trainer's data order for the seed (the same
batches for every method at a given seed), with CE + 1 × T² × KL(base ‖ model at T = 2), AdamW (no weight
decay), linear warmup over 10 % of --max-steps then constant lr, clipping at 1.0. The validation loss is
measured every --eval-every steps; with --trend-window N a run stops when the least-squares line through the
last N validation losses falls by less than --min-delta across them (default 0.01 nats), or at --max-steps.
Use it (N = 12: 300 steps at --eval-every 25) for "until the loss plateaus": the evaluation-to-evaluation
noise of a constant learning rate is larger than a late run's progress per evaluation, so the default rule
(stop after --patience evaluations without an improvement of --min-delta, default 1e-3 nats), which the
results recorded so far used, stopped runs that were still improving (docs/study/plateau/). The trainable
parameters then go back to their best-validation values, which are scored on every packed --seq-len sequence
of domain_eval and general_eval (the model's own next-token cross-entropy; at step 0
nexus.validate.metrics.evaluate against a frozen base, which also gives the base's losses, the same in every
run). With --general-val (the testbed's general_val.jsonl: general text that neither pretraining nor the
scoring saw) every evaluation also measures the general loss there against the base's, and the checkpoint with
the lowest validation loss among those under --max-general % (default 5) is scored the same way (`selected`
in the results; the report's "Checkpoints selected on general validation text"): the point a user who must
keep general text within the limit would ship, where the best-validation checkpoint may be far past it
(`general_val_eval_s`: the median time of that extra evaluation). With --replay JSONL (the testbed's
general_train.jsonl) every method also distills the base on general text: each step adds one batch of it whose
loss is --replay-weight × T² × KL(base ‖ model), the replayed sequences being those `nexus train
--replay-dataset` reads (the same for every method at a seed); a step then costs about twice as much. Router statistics: `nexus collect` once on the
training part of domain_train (--stats-tokens), `nexus analyze`'s PCA selection for the topK inits; with
--hidden-tokens N (default 2048) collect also keeps N tokens' hidden states, on which convert ranks the hidden
units that feature_topK and pruned_topK keep (mean |activation| × weighted down-row norm; 0: by weights).

Methods: nexus-INIT (frozen router) for each of --nexus-inits (a topK init takes its experts from `nexus
analyze`'s PCA ranking, frequency_topK from its routing-frequency ranking); nexus-INIT-router (trainable router) for
--router-init; esft (ESFT token share: per layer the most-routed experts until their cumulative share
reaches --esft-threshold); esft-matched (per layer as many experts as NEXUS's shared expert is wide, the
same trainable count); lora-attn-experts and lora-attn (PEFT LoRA, rank matched to NEXUS's trainable
count); full-moe (every routed expert and router: the ceiling). ESFT's chosen experts are split out as
their own trainable tensors (a delta on their slices of the frozen fused expert tensors, written back for
scoring), so gradients and AdamW state exist for them only. FLOPs per token at inference: 2 × active parameters (input embeddings excluded,
routed experts at top_k / num_experts), plus 2 × the shared experts' parameters for NEXUS; merged LoRA,
ESFT and full-moe add nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from nexus.teacher.cache import file_sha256

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_lib as L  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SMOKE = dict(lrs=[1e-3, 1e-2], seeds=[0], max_steps=3, eval_every=1, trend_window=3, eval_num=6, val_num=4,
             nexus_inits=["random", "pca_top8", "pruned_top8"], stats_tokens=8000, hidden_tokens=256, batch=4)


def methods(args) -> list[str]:
    out = [f"nexus-{i}" for i in args.nexus_inits] + [f"nexus-{args.router_init}-router",
                                                      "esft", "esft-matched", "lora-attn-experts", "lora-attn",
                                                      "full-moe"]
    return [m for m in out if not args.methods or m in args.methods]


def check_methods(args) -> str | None:
    """What is wrong with --methods / --nexus-inits / --router-init, as a one-line message, or None. Every
    --methods name must be one the other flags make; every NEXUS init that would run must be one convert
    knows at the study's width (one expert): random or {pca,frequency,aligned,feature,pruned}_topK."""
    from nexus.convert.strategy import parse_strategy
    from nexus.errors import NexusError

    known = methods(argparse.Namespace(**{**vars(args), "methods": None}))
    unknown = [m for m in args.methods or [] if m not in known]
    if unknown:
        return f"--methods: unknown {', '.join(unknown)} (expected some of: {', '.join(known)})"
    for m in methods(args):
        if not m.startswith("nexus-"):
            continue
        init = m.removeprefix("nexus-").removesuffix("-router")
        flag = "--router-init" if m.endswith("-router") else "--nexus-inits"
        try:
            kind = parse_strategy(init).kind
        except NexusError:
            kind = None
        if kind not in ("random", "pca", "frequency", "aligned", "feature", "pruned"):
            return (f"{flag} {init!r}: not an init the study runs (expected random or pca_topK / frequency_topK / "
                    f"aligned_topK / feature_topK / pruned_topK, e.g. pruned_top8)")
    return None


def done_keys(path: Path) -> set[tuple[str, float, int]]:
    """(method, lr, seed) of every finished run in a results file (missing file: none)."""
    if not path.is_file():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out.add((r["method"], float(r["lr"]), int(r["seed"])))
    return out


def pending(runs: list[tuple[str, float, int]], path: Path) -> list[tuple[str, float, int]]:
    """The runs not yet in the results file, in order."""
    done = done_keys(path)
    return [r for r in runs if (r[0], float(r[1]), int(r[2])) not in done]


def digest(paths: list[Path]) -> str:
    """sha256 over the names and bytes of `paths` (a directory stands for its config.json and *.safetensors):
    what a path names can change under it (a testbed rebuilt on another machine, other installed files), and a
    study must not pair runs, or reuse statistics and step-0 scores, across such a change."""
    h = hashlib.sha256()
    for path in map(Path, paths):
        files = sorted([path / "config.json", *path.glob("*.safetensors")]) if path.is_dir() else [path]
        for f in files:
            h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def machine() -> dict:
    """The CPU a run trained on and the kernels torch dispatched to: the same weights train to slightly different
    numbers on another CPU (vendor and instruction set pick torch's and MKL's kernels; docs/testbed.md)."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cpu_kernels": torch.backends.cpu.get_cpu_capability()}


def fingerprints(args) -> dict:
    """The content digests of the model's weights and of the study's data splits."""
    return {"model_sha256": digest([args.model]),
            "data_sha256": digest([args.domain_train, args.domain_eval, args.general_eval])}


def prepare(args, work: Path, prints: dict) -> dict:
    """Data split, router statistics, selections, LoRA ranks, ESFT choices, FLOPs (cached in setup.json)."""
    cache = work / "setup.json"
    inputs = {k: getattr(args, k) for k in ("model", "domain_train", "domain_eval", "general_eval", "val_frac",
                                            "stats_tokens", "esft_threshold", "seq_len", "hidden_tokens")} | prints
    if cache.is_file():
        setup = json.loads(cache.read_text())
        old = setup.get("inputs", {})
        if old != inputs:
            differ = ", ".join(f"{k} {old.get(k)!r} -> {inputs.get(k)!r}" for k in sorted(set(old) | set(inputs))
                               if old.get(k) != inputs.get(k))
            raise SystemExit(f"{cache} was prepared for other inputs ({differ}); use another --work")
        return setup
    fit, val = L.split_train_val(args.domain_train, work, args.val_frac)
    data = {"domain_train": fit, "domain_val": val, "domain_eval": args.domain_eval, "general_eval": args.general_eval}
    stats = L.router_stats(args.model, fit, work / "router_stats.safetensors", args.stats_tokens, args.seq_len,
                           args.hidden_tokens)
    base = L.load_base_model(args.model, dtype=torch.float32)
    act = L.active_params(base)
    n_nexus = L.nexus_param_count(args.model)
    per_expert = act["experts"] // (len(L.find_blocks(base)) * L.find_blocks(base)[0].layout.num_experts)
    per_layer = max(1, round(n_nexus / len(L.find_blocks(base)) / per_expert))
    del base
    setup = {"inputs": inputs, "data": data, "stats": str(stats), "active": act, "nexus_params": n_nexus,
             "lora_rank": {k: L.lora_rank_for(args.model, n_nexus, experts=k == "lora-attn-experts")
                           for k in ("lora-attn-experts", "lora-attn")},
             "esft": {"esft": L.esft_choice(stats, threshold=args.esft_threshold),
                      "esft-matched": L.esft_choice(stats, per_layer=per_layer)}}
    cache.write_text(json.dumps(setup, indent=1))
    return setup


def start_key(method: str, seed: int) -> str:
    """Runs whose step-0 model is the same: a NEXUS adapter (init, seed), whatever its lr or router; the
    base model for every other method."""
    if method.startswith("nexus"):
        return f"{method.removesuffix('-router')}-s{seed}"
    return "base"


def cached_start(path: Path, method: str, seed: int, protocol: dict) -> dict | None:
    """The step-0 scores of an earlier run with the same start_key, evaluation settings and model and data
    contents (`fingerprints`), if any; a row written before rows carried fingerprints is never reused."""
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        r = json.loads(line) if line.strip() else None
        if r and start_key(r["method"], int(r["seed"])) == start_key(method, seed) and \
                all(r.get("protocol", {}).get(k) == protocol.get(k) for k in ("seq_len", "eval_num", "hidden_tokens")) \
                and r["model"] == protocol["model"] \
                and all(r.get(k) == protocol[k] for k in ("model_sha256", "data_sha256")):
            return r["start"]
    return None


def run_kwargs(args, setup: dict, work: Path, method: str, lr: float, seed: int) -> dict:
    kw = dict(model=args.model, data=setup["data"], method=method, lr=lr, seed=seed, root=str(work),
              tag=f"{method}-lr{lr:g}-s{seed}", eval_num=args.eval_num, val_num=args.val_num, batch=args.batch,
              seq_len=args.seq_len, max_steps=args.max_steps, eval_every=args.eval_every, patience=args.patience,
              min_delta=args.min_delta, trend_window=args.trend_window)
    if args.general_val:  # not part of setup.json: it changes what a run measures, not its setup
        kw.update(data={**setup["data"], "general_val": args.general_val}, max_general=args.max_general)
    if args.replay:
        kw.update(data={**kw["data"], "replay": args.replay}, replay_weight=args.replay_weight)
    if method.startswith("nexus"):
        init = method[len("nexus-"):].removesuffix("-router")
        k = L.init_top_k(init)
        ranking = "frequency" if init.startswith("frequency_") else "pca"  # frequency_topK: analyze's frequency ranking
        sel = L.selection(Path(setup["stats"]), work, k, ranking) if k else None
        sample = work / "router_stats.raw.safetensors" if args.hidden_tokens else None
        kw.update(adapter_dir=L.adapter(args.model, work, init, sel, seed, sample), train_router=method.endswith("-router"))
    elif method.startswith("lora"):
        kw.update(kind=method, rank=setup["lora_rank"][method])
    elif method.startswith("esft"):
        kw.update(kind=method, chosen={int(k): v for k, v in setup["esft"][method].items()})
    else:
        kw.update(kind=method)
    return kw


def main(argv: list[str] | None = None) -> None:
    from nexus import demo_data

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(demo_data.DEMO_MODEL_DIR), help="model directory (default: the demo model)")
    p.add_argument("--domain-train", help="domain training JSONL (default: the demo's domain_train)")
    p.add_argument("--domain-eval", help="domain held-out JSONL (default: the demo's domain_eval)")
    p.add_argument("--general-eval", help="general held-out JSONL (default: the demo's general_eval)")
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", help="only these methods (names as in the docstring)")
    p.add_argument("--nexus-inits", nargs="+", default=["random", "feature_top8", "pruned_top8", "pca_top8"])
    p.add_argument("--router-init", default="random", help="init of the trainable-router NEXUS run (default random)")
    p.add_argument("--esft-threshold", type=float, default=0.3, help="ESFT cumulative token share (default 0.3)")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=25, help="steps between validation evaluations")
    p.add_argument("--trend-window", type=int, default=0, metavar="N",
                   help="stop when the least-squares line through the last N validation losses falls by less than "
                        "--min-delta across them (e.g. 12; default 0: the --patience rule, which keeps the commands "
                        "recorded in earlier results reproducible)")
    p.add_argument("--patience", type=int, default=4,
                   help="with --trend-window 0: evaluations without an improvement of --min-delta before stopping")
    p.add_argument("--min-delta", type=float,
                   help="nats: the fall across the trend window that counts as progress (default 0.01); with "
                        "--trend-window 0 the improvement that counts (default 1e-3)")
    p.add_argument("--val-frac", type=float, default=0.1, help="domain_train documents held out for validation")
    p.add_argument("--general-val", metavar="JSONL",
                   help="general text held out from pretraining and scoring (the testbed's general_val.jsonl): "
                        "measured at every validation evaluation, and the checkpoint with the lowest domain "
                        "validation loss whose general loss there is under --max-general %% above the base's is "
                        "scored too (`selected` in the results)")
    p.add_argument("--max-general", type=float, default=5.0,
                   help="with --general-val: the general loss increase (%%) a selected checkpoint stays under (default 5)")
    p.add_argument("--replay", metavar="JSONL",
                   help="general text every method also distills the base on (the testbed's general_train.jsonl): "
                        "each step adds --replay-weight × T² × KL(base ‖ model) on one batch of it, as `nexus train "
                        "--replay-dataset` does (the same sequences for every method at a seed)")
    p.add_argument("--replay-weight", type=float, default=1.0, help="with --replay: weight of its KL term (default 1)")
    p.add_argument("--val-num", type=int, help="validation sequences (default: all of the slice)")
    p.add_argument("--eval-num", type=int, help="evaluation sequences per split (default: all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--stats-tokens", type=int, default=100000)
    p.add_argument("--hidden-tokens", type=int, default=2048,
                   help="tokens whose hidden states rank feature/pruned units (0: rank by weights; default 2048)")
    p.add_argument("--work", default="/tmp/nexus-study", help="adapters, data split, statistics")
    p.add_argument("--out", default=str(ROOT / "docs" / "study"), help="results.jsonl and the report")
    p.add_argument("--doc", help="also write the report as this markdown file (e.g. docs/study.md)")
    p.add_argument("--no-isolate", action="store_true", help="run in this process (RSS is then cumulative)")
    p.add_argument("--smoke", action="store_true", help="tiny budgets: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    p.add_argument("--report", action="store_true", help="only rewrite the report from results.jsonl")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    if args.trend_window and args.trend_window < 3:
        p.error(f"--trend-window: expected 0 (the patience rule) or at least 3 evaluations, got {args.trend_window}")
    if args.min_delta is None:
        args.min_delta = 0.01 if args.trend_window else 1e-3
    if args.general_val and not Path(args.general_val).is_file():
        p.error(f"--general-val: expected a JSONL file of general text, {args.general_val} does not exist")
    if args.replay and not Path(args.replay).is_file():
        p.error(f"--replay: expected a JSONL file of general text, {args.replay} does not exist")
    if not (math.isfinite(args.replay_weight) and args.replay_weight > 0):
        p.error(f"--replay-weight: expected a positive number, got {args.replay_weight:g}")
    if not 0 < args.max_general:
        p.error(f"--max-general: expected a positive percentage, got {args.max_general:g}")
    if (problem := check_methods(args)) is not None:
        p.error(problem)
    if not args.report and not (Path(args.model) / "config.json").is_file():
        p.error(f"--model: expected a local model directory with config.json, got {args.model}")
    for split in ("domain_train", "domain_eval", "general_eval"):
        if getattr(args, split) is None:
            setattr(args, split, str(Path(args.work) / "data" / f"{split}.jsonl"))
            if not Path(getattr(args, split)).is_file():
                Path(getattr(args, split)).parent.mkdir(parents=True, exist_ok=True)
                demo_data.write_split(split, getattr(args, split))
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    command = "python benchmarks/study.py " + " ".join(shlex.quote(a) for a in argv)
    if not args.report:
        t_setup = time.time()
        prints = fingerprints(args)
        setup = prepare(args, work, prints)
        print(f"setup {time.time() - t_setup:.0f}s: NEXUS trainable {setup['nexus_params']:,}, LoRA ranks "
              f"{setup['lora_rank']}, ESFT experts/layer "
              f"{ {k: [len(v) for v in c.values()] for k, c in setup['esft'].items()} }", flush=True)
        grid = [(m, lr, s) for s in args.seeds for m in methods(args) for lr in args.lrs]
        todo = pending(grid, results)
        print(f"{len(grid)} runs, {len(grid) - len(todo)} already in {results}", flush=True)
        for method, lr, seed in todo:
            t0 = time.time()
            kw = run_kwargs(args, setup, work, method, lr, seed)
            kw["start"] = cached_start(results, method, seed, {"seq_len": args.seq_len, "eval_num": args.eval_num,
                                                               "hidden_tokens": args.hidden_tokens, "model": args.model}
                                     | prints)
            res = L.run_one(kw) if args.no_isolate else L.isolated(kw)
            added = setup["nexus_params"] if method.startswith("nexus") else 0
            row = {"method": method, "lr": lr, "seed": seed, "model": args.model, **prints, "command": command,
                   "flops_per_token": L.flops_per_token(setup["active"]["active"], added),
                   "active_params": setup["active"]["active"] + added, "seconds": time.time() - t0,
                   "start_scores": "reused" if kw["start"] else "measured",
                   "torch": torch.__version__, "threads": torch.get_num_threads(), **machine(),
                   "protocol": {k: getattr(args, k) for k in ("max_steps", "eval_every", "patience", "min_delta",
                                                              "trend_window", "val_frac", "batch", "seq_len",
                                                              "eval_num", "val_num", "hidden_tokens")}
                   | ({"general_val": args.general_val, "max_general": args.max_general} if args.general_val else {})
                   | ({"replay": args.replay, "replay_weight": args.replay_weight} if args.replay else {}),
                   **res}
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            s, e = res["start"], res["end"]
            print(f"{method} lr {lr:g} seed {seed}: {res['steps']} steps (best {res['best_step']}, "
                  f"{res['stopped']}), domain loss {s['base_domain_loss']:.4f} -> {e['domain_loss']:.4f}, general "
                  f"{s['base_general_loss']:.4f} -> {e['general_loss']:.4f}, {res['trainable']:,} params, "
                  f"{res['step_s'] * 1e3 if res['step_s'] else math.nan:.0f} ms/step, RSS {res['rss_mib']:.0f} MiB, "
                  f"scored on {res['eval_tokens']['domain']:,} domain / {res['eval_tokens']['general']:,} general "
                  f"tokens "
                  f"({time.time() - t0:.0f}s)", flush=True)
            if args.general_val:
                sel = res["selected"]
                print(f"  selected under {args.max_general:g} % on general_val: " + (
                      f"step {sel['step']} (general_val {sel['general_val_change']:+.2f} %), domain loss "
                      f"{sel['end']['domain_loss']:.4f}, general {sel['end']['general_loss']:.4f}" if sel else
                      "none (every evaluation, step 0 included, was over the limit)"), flush=True)
    import study_report

    print(study_report.write_report(results, out, Path(args.doc) if args.doc else None,
                                    report_command=command if args.report else None))


if __name__ == "__main__":
    main()
