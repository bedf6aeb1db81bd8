"""How much of concat_topK's output a one-expert-wide shared expert keeps, by how its hidden units are ranked.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_units.py --model MODEL --train TRAIN.jsonl \
        --eval EVAL.jsonl --workdir /tmp/nexus-bench-units

`concat_topK` (the K selected experts side by side, weighted) computes exactly Σ wₖ Eₖ(x); `pruned_topK`
at width M keeps M × I of its K × I hidden units. This measures, per MoE layer, on tokens none of the
rankings saw (held-out text, `nexus collect --keep-raw N --keep-hidden` on --eval), the relative error
‖pruned(x) − concat(x)‖² / ‖concat(x)‖² of three rankings:

- activations: `nexus convert --hidden-sample` on the hidden states of --train (mean |activation| ×
  weighted down-row norm);
- weights: the same convert without a sample (‖gate‖·‖up‖·‖weighted down‖);
- random: M × I units drawn uniformly (--seed), the floor any ranking should beat.

Experts are selected as `nexus analyze` does (PCA ranking, importance weights) from router statistics
of --train. Prints a markdown table and writes --output (JSON).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def collect(model: str, data: str, out: Path, tokens: int, sample: int, seq_len: int, seed: int) -> Path:
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "nexus", "collect", "--model", model, "--dataset", data, "--output",
                        str(out), "--target-tokens", str(tokens), "--seq-len", str(seq_len), "--batch-size", "16",
                        "--keep-raw", str(sample), "--keep-hidden", "--seed", str(seed), "--device", "cpu",
                        "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    return out


def main(argv: list[str] | None = None) -> None:
    from nexus.adapter import WEIGHTS_NAME, load_model
    from nexus.convert.core import convert
    from nexus.convert.merge import from_units, keep_units, to_units
    from nexus.moe import find_moe_blocks
    from nexus.shared import SHARED_NAME, build_shared_expert, run_shared_expert
    from nexus.stats.accumulate import RouterStats
    from nexus.stats.analyze import analyze_stats
    from nexus.stats.reservoir import raw_path, read_hidden
    from safetensors.torch import load_file

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True, help="text the router statistics and the ranking sample come from")
    p.add_argument("--eval", required=True, help="held-out text the error is measured on")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--width", type=float, default=1.0, help="--width-multiplier of the pruned expert (default 1)")
    p.add_argument("--stats-tokens", type=int, default=100_000)
    p.add_argument("--sample", type=int, default=2048, help="hidden states kept for the ranking and for the error")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/nexus-bench-units")
    p.add_argument("--output", help="JSON results (default WORKDIR/units.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    train = collect(args.model, args.train, work / "train.safetensors", args.stats_tokens, args.sample, args.seq_len, 0)
    held = collect(args.model, args.eval, work / "eval.safetensors", args.stats_tokens, args.sample, args.seq_len, 1)
    selection = work / f"top{args.top_k}.json"
    selection.write_text(json.dumps(analyze_stats(RouterStats.load(train)[0], args.top_k, "pca",
                                                  merge_weights="importance")))
    name = f"_top{args.top_k}"
    runs = {"concat": dict(init_strategy="concat" + name),
            "activations": dict(init_strategy="pruned" + name, width_multiplier=args.width,
                                hidden_sample=str(raw_path(train))),
            "weights": dict(init_strategy="pruned" + name, width_multiplier=args.width)}
    for tag, kw in runs.items():
        convert(args.model, str(work / tag), pca_stats=str(selection), check=False, overwrite=True,
                log=lambda *a: None, **kw)
    model = load_model(args.model, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    tensors = {tag: load_file(str(work / tag / WEIGHTS_NAME)) for tag in runs}
    for block in find_moe_blocks(model):
        prefix = f"{block.path}.{SHARED_NAME}."
        x = read_hidden(raw_path(held), block.layer).float()  # (n, H) held-out tokens

        def output(params: dict[str, torch.Tensor]) -> torch.Tensor:
            inter = to_units({k: v[0] for k, v in params.items()}, block.layout)["down"].shape[0]
            module = build_shared_expert(block, model, intermediate_size=inter, device="cpu")
            with torch.no_grad():
                for k, v in params.items():
                    getattr(module, k).copy_(v)
                return run_shared_expert(module, x)

        params = {tag: {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)} for tag, t in tensors.items()}
        concat = output(params["concat"])
        units = to_units({k: v[0] for k, v in params["concat"].items()}, block.layout)
        keep = params["activations"]["down_proj"].numel() // x.shape[1]
        drawn = sorted(torch.randperm(units["down"].shape[0], generator=gen)[:keep].tolist())
        params["random"] = from_units(keep_units(units, drawn), block.layout)
        energy = float(concat.pow(2).sum())
        row = {"layer": block.layer, "tokens": x.shape[0], "units_kept": keep, "units_merged": units["down"].shape[0]}
        for tag in ("activations", "weights", "random"):
            row[tag] = float((output(params[tag]) - concat).pow(2).sum()) / energy
        rows.append(row)
    result = {"model": args.model, "top_k": args.top_k, "width": args.width, "sample": args.sample,
              "command": "python benchmarks/bench_units.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__, "layers": rows}
    out = Path(args.output or work / "units.json")
    out.write_text(json.dumps(result, indent=1))
    print("| layer | units kept | activations | weights | random |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layer']} | {r['units_kept']} of {r['units_merged']} | {r['activations']:.3f} | "
              f"{r['weights']:.3f} | {r['random']:.3f} |")
    mean = {t: sum(r[t] for r in rows) / len(rows) for t in ("activations", "weights", "random")}
    print(f"| mean | | {mean['activations']:.3f} | {mean['weights']:.3f} | {mean['random']:.3f} |")
    print(f"relative squared error of pruned{name} at width {args.width:g} against concat{name} on "
          f"{rows[0]['tokens']:,} held-out tokens per layer -> {out}")


if __name__ == "__main__":
    main()
