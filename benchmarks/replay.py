"""Replay: does distilling the base on general text (`nexus train --replay-dataset`) keep the general loss
down at the same domain gain?

Runs `nexus train` (a subprocess, as a user would) once per --replay-weights value, 0 meaning no replay,
everything else equal: shared experts attached to --model with --init-strategy, trained on --domain-train,
with the full --domain-eval split as --eval-dataset and the full --general-eval split as
--general-eval-dataset, evaluated every --eval-every steps. Reads each run's metrics.jsonl and writes
OUT/replay.json and OUT/replay.md: per evaluation the domain gain (1 - eval_ce / the base's CE on
--domain-eval, in %) and the general change (eval_general_change, %); per run the last evaluation under
--max-general %, which is what best/ picks when the domain loss is still falling (selected on the
reported split, so optimistic alike for every run).

On the testbed (scripts/pretrain_testbed.py; DATA = its data directory):

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 5 python benchmarks/replay.py --model /tmp/nexus-testbed \
        --domain-train DATA/domain_train.jsonl --domain-eval DATA/domain_eval.jsonl \
        --general-eval DATA/general_eval.jsonl --replay DATA/general_train.jsonl \
        --replay-weights 0 1 --lr 3e-3 --max-steps 800 --eval-every 100 --work /tmp/nexus-replay \
        --out docs/study/replay

`--runs W` runs only those weights (two processes on two cores, then `--report` alone writes the files).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_command(args, weight: float) -> list[str]:
    cmd = ["nexus", "train", "--student-model", args.model, "--init-strategy", args.init_strategy,
           "--dataset", args.domain_train, "--eval-dataset", args.domain_eval,
           "--general-eval-dataset", args.general_eval, "--max-general-increase", str(args.max_general),
           "--eval-every", str(args.eval_every), "--max-steps", str(args.max_steps),
           "--learning-rate", str(args.lr), "--batch-size", str(args.batch), "--seq-len", str(args.seq_len),
           "--seed", str(args.seed), "--checkpoint-interval", str(args.eval_every), "--save-total-limit", "1",
           "--logging-steps", "50",
           "--device", "cpu", "--output-dir", str(run_dir(args, weight))]
    if weight > 0:
        cmd += ["--replay-dataset", args.replay, "--replay-weight", f"{weight:g}"]
    return cmd


def run_dir(args, weight: float) -> Path:
    return Path(args.work) / f"replay-{weight:g}"


def base_domain_ce(args) -> float:
    """The frozen base's CE on --domain-eval, packed as `nexus train` packs --eval-dataset."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from nexus.data import load_tokenizer
    from nexus.stream import DataSpec, SequenceStream, build_sequences

    seqs = build_sequences(DataSpec(args.domain_eval, seq_len=args.seq_len), load_tokenizer(args.model))
    stream = SequenceStream(seqs, shuffle=False)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), args.batch):
            ids, mask = stream.batch(range(i, min(i + args.batch, len(seqs))))
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            keep = (mask[:, :-1] * mask[:, 1:]).bool()
            total += F.cross_entropy(logits[keep], ids[:, 1:][keep], reduction="sum").item()
            n += int(keep.sum())
    return total / n


def run(args, weight: float) -> None:
    out = run_dir(args, weight)
    if (out / "final").is_dir():
        print(f"replay {weight:g}: done already ({out})")
        return
    cmd = train_command(args, weight)
    if out.exists():
        cmd += ["--resume-from-checkpoint", "latest"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    if subprocess.run([sys.executable, "-m", "nexus", *cmd[1:]], env=env).returncode != 0:
        sys.exit(f"replay {weight:g}: nexus train failed (see above); rerun to continue from its checkpoint")
    (out / "wall_s.json").write_text(json.dumps({"wall_s": time.perf_counter() - t0}))


def made_by(args) -> str:
    """This script's flags for these runs (without --runs / --report)."""
    return (f"--model {args.model} --domain-train {args.domain_train} --domain-eval {args.domain_eval} "
            f"--general-eval {args.general_eval} --replay {args.replay} --replay-weights "
            f"{' '.join(f'{w:g}' for w in args.replay_weights)} --init-strategy {args.init_strategy} --lr {args.lr:g} "
            f"--max-steps {args.max_steps} --eval-every {args.eval_every} --batch {args.batch} --seq-len {args.seq_len} "
            f"--seed {args.seed} --max-general {args.max_general:g} --work {args.work} --out {args.out}")


def report(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = base_domain_ce(args)
    runs = []
    for weight in args.replay_weights:
        d = run_dir(args, weight)
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        evals = [{"step": r["step"], "domain_gain": 100 * (1 - r["eval_ce"] / base),
                  "general_change": r["eval_general_change"], "replay_kl": r.get("replay_kl")}
                 for r in rows if "eval_ce" in r]
        under = [e for e in evals if e["general_change"] < args.max_general]
        wall = json.loads((d / "wall_s.json").read_text())["wall_s"] if (d / "wall_s.json").is_file() else None
        speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
        runs.append({"replay_weight": weight, "command": " ".join(train_command(args, weight)), "evals": evals,
                     "last_under_limit": under[-1] if under else None, "wall_s": wall,
                     "median_tokens_per_s": statistics.median(speeds) if speeds else None})
    result = {"base_domain_ce": base, "max_general": args.max_general, "runs": runs}
    (out / "replay.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Replay: distilling the base on general text beside the domain data", "",
             f"Written by `benchmarks/replay.py` (`--report`); the base's CE on --domain-eval: {base:.4f}. Domain "
             "gain = 100 × (1 − eval_ce / that); general change = eval_general_change, against the base's CE on "
             "--general-eval. One seed per run; every run has the same data order, init and schedule.", "",
             "Made by:", "", f"    python benchmarks/replay.py {made_by(args)}", "",
             "which ran:", ""] + [f"    {r['command']}" for r in runs] + [""]
    steps = [e["step"] for e in runs[0]["evals"]]
    head = "| step | " + " | ".join(f"replay {r['replay_weight']:g}: domain gain / general change" for r in runs)
    lines += [head + " |", "|---:|" + "---:|" * len(runs)]
    for i, step in enumerate(steps):
        cells = []
        for r in runs:
            e = r["evals"][i] if i < len(r["evals"]) else None
            cells.append(f"{e['domain_gain']:+.2f} % / {e['general_change']:+.2f} %" if e else "")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", f"Last evaluation under +{args.max_general:g} % general change (chosen on the reported general split "
              "itself, so optimistic alike for every run; best/ holds the one with the lowest domain CE, the same "
              "while that loss is still falling):", ""]
    for r in runs:
        e = r["last_under_limit"]
        what = f"step {e['step']}: domain gain {e['domain_gain']:+.2f} %, general change {e['general_change']:+.2f} %" \
            if e else "none"
        speed = f"; median {r['median_tokens_per_s']:,.0f} domain tokens/s" if r["median_tokens_per_s"] else ""
        lines.append(f"- replay {r['replay_weight']:g}: {what}{speed}")
    (out / "replay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--domain-train", required=True)
    p.add_argument("--domain-eval", required=True)
    p.add_argument("--general-eval", required=True)
    p.add_argument("--replay", required=True, help="general text to replay (not --general-eval)")
    p.add_argument("--replay-weights", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--runs", type=float, nargs="*", help="run only these weights (default: all)")
    p.add_argument("--report", action="store_true", help="only write the report from finished runs")
    p.add_argument("--init-strategy", default="random")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-steps", type=int, default=800)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-general", type=float, default=5.0)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    bad = [w for w in args.replay_weights if not (math.isfinite(w) and w >= 0)]
    if bad:
        p.error(f"--replay-weights must be non-negative numbers, got {bad}")
    if not args.report:
        for weight in args.runs if args.runs is not None else args.replay_weights:
            run(args, weight)
    if args.report or args.runs is None:
        report(args)


if __name__ == "__main__":
    main()
