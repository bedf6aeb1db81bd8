"""Validate a model against its baseline on held-out data: perplexity, KL and routing per layer; then chat.

    nexus validate --model adapter/ --dataset general=heldout.jsonl --dataset domain=docs/ \\
        --compute-perplexity --num-samples 200 --seq-len 1024 --output validation/
    nexus validate --model adapter/ --chat                 # straight to an interactive chat

The baseline defaults to the adapter's own base: the loaded model is then run a second time with its
shared experts switched off, so no second copy is loaded. --baseline naming another model (or
adapter) loads it and compares against that. Both see exactly the same tokens. Writes report.json,
report.md and plots/ to --output (the folder appears only once complete). With
--fail-on-degradation the exit code is 1 when a dataset's perplexity degrades by more than
--fail-threshold percent. --chat opens `nexus chat` on the model after the report.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from ..adapter import resolve_base, is_adapter_dir, read_adapter_config
from ..chat.session import add_sampling_arguments, sampling_from_args, start_chat
from ..data import check_seq_len, iter_documents, load_tokenizer, pad_batch, tokenizer_fingerprint
from ..defaults import SEQ_LEN_HELP, seq_len_for
from ..device import add_device_arguments, load_for_inference
from ..errors import NexusError
from ..fsutil import same_path
from ..packing import iter_pieces
from ..progress import bar
from .metrics import evaluate
from .report import EXCELLENT_BELOW_PCT, FAIL, FAIL_ABOVE_PCT, build_report, overall_verdict, verdict, write_report

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_datasets(values: list[str]) -> dict[str, str]:
    """`--dataset` values (`NAME=PATH` or `PATH`) -> {name: path}; a bare path is named by its stem."""
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or Path(value).exists() or not _NAME.match(name):
            name, path = Path(value).stem or value, value
        if not path:
            raise NexusError(f"--dataset {value}: empty path (expected NAME=PATH or PATH)")
        if name in out:
            raise NexusError(f"--dataset: the name '{name}' is given twice; name them NAME=PATH")
        out[name] = path
    return out


def sequences(path: str, tokenizer, seq_len: int, num_samples: int, packed: bool = False,
              text_field: str = "text") -> list[list[int]]:
    """The first `num_samples` evaluation sequences of a dataset, each at most `seq_len` tokens.

    Unpacked (default): each document is cut into pieces of at most `seq_len` tokens, so no sequence
    spans two documents (short pieces are padded in the batch). Packed: documents are concatenated
    with EOS between them and cut into full `seq_len` sequences (no padding).
    """
    out: list[list[int]] = []
    counts: dict = {}
    texts = (doc.text for doc in iter_documents(path, tokenizer, text_field))
    for pieces in iter_pieces(texts, tokenizer, seq_len, pack=packed, counts=counts):
        out += pieces.head(num_samples - len(out)).tolist()
        if len(out) >= num_samples:
            break
    docs = counts.get("docs", 0)
    if not docs:
        raise NexusError(f"--dataset {path}: no non-empty documents")
    if not out:
        raise NexusError(f"--dataset {path}: no evaluation sequence of at least "
                         f"{seq_len if packed else 2} tokens (documents too short{' for --pack' if packed else ''})")
    return out


def batches(seqs: list[list[int]], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids (B, L), attention_mask (B, L)) right-padded to the longest sequence of each batch."""
    for i in range(0, len(seqs), batch_size):
        yield pad_batch(seqs[i:i + batch_size], pad_id)


def _display(path: str) -> str:
    p = Path(path)
    return str(p.resolve()) if p.exists() else path


def baseline_plan(model: str, baseline: str | None) -> tuple[str | None, str]:
    """(separate baseline to load, or None to run `model` with its shared experts off; baseline name)."""
    if is_adapter_dir(model):
        base = resolve_base(Path(model), read_adapter_config(model)["base_model_name_or_path"])
        if baseline is None or same_path(baseline, base):
            return None, _display(base)
    elif baseline is None:
        raise NexusError(f"--model {model} is not a NEXUS adapter, so it has no base to compare with; "
                         f"pass --baseline")
    return baseline, _display(baseline)


def check_options(args) -> dict[str, str]:
    """Flag values alone (no file access; `nexus pipeline` checks these before any stage runs);
    returns the named datasets."""
    datasets = parse_datasets(args.dataset)
    if not datasets and not args.chat:
        raise NexusError("nothing to do: pass --dataset (held-out data to measure on) and/or --chat")
    if args.compute_perplexity and not datasets:
        raise NexusError("--compute-perplexity needs at least one --dataset")
    if args.fail_on_degradation and not args.compute_perplexity:
        raise NexusError("--fail-on-degradation needs --compute-perplexity (the verdict is on perplexity)")
    for flag, value, low in (("--num-samples", args.num_samples, 1), ("--seq-len", args.seq_len, 2),
                             ("--batch-size", args.batch_size, 1)):
        if value is not None and value < low:
            raise NexusError(f"{flag} must be >= {low}, got {value}")
    if args.excellent_threshold > args.fail_threshold:
        raise NexusError(f"--excellent-threshold ({args.excellent_threshold}) must not exceed "
                         f"--fail-threshold ({args.fail_threshold})")
    if args.chat:
        sampling_from_args(args)
    return datasets


def check_args(args) -> dict[str, str]:
    """Validate flag values and inputs before any model is loaded; returns the named datasets."""
    datasets = check_options(args)
    for path in datasets.values():  # before any model is loaded
        if not Path(path).exists():
            raise NexusError(f"--dataset {path}: no such file or directory")
    if datasets and Path(args.output).exists() and not args.overwrite:
        raise NexusError(f"--output {args.output}: exists (pass --overwrite to replace it)")
    return datasets


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="NEXUS adapter directory (or a transformers model directory)")
    p.add_argument("--baseline", default=None,
                   help="model to compare against (default: the adapter's base, run as the same loaded model "
                        "with the shared experts off)")
    p.add_argument("--dataset", action="append", default=[], metavar="[NAME=]PATH",
                   help="held-out data (.txt, .jsonl, .json, .parquet, folder, saved HF dataset); repeat for "
                        "several, e.g. --dataset general=a.jsonl --dataset domain=b/")
    p.add_argument("--text-field", default="text", help="record field holding the text (default text; "
                   "records with 'messages' are rendered with the chat template)")
    p.add_argument("--compute-perplexity", action="store_true",
                   help="compute perplexity and degradation (KL and routing metrics are always computed)")
    p.add_argument("--num-samples", type=int, default=200, help="evaluation sequences per dataset (default 200)")
    p.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence at most {SEQ_LEN_HELP}")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass (default 1)")
    p.add_argument("--pack", action="store_true",
                   help="concatenate documents into full --seq-len sequences (default: one document per "
                        "sequence, padded)")
    p.add_argument("--output", default="validation", help="report directory (default ./validation)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    p.add_argument("--excellent-threshold", type=float, default=EXCELLENT_BELOW_PCT,
                   help=f"degradation %% below which retention is excellent (default {EXCELLENT_BELOW_PCT:g})")
    p.add_argument("--fail-threshold", type=float, default=FAIL_ABOVE_PCT,
                   help=f"degradation %% above which the verdict is fail (default {FAIL_ABOVE_PCT:g})")
    p.add_argument("--fail-on-degradation", action="store_true",
                   help="exit with code 1 when a dataset's verdict is fail")
    p.add_argument("--chat", action="store_true", help="chat with the model after the report (see nexus chat)")
    add_sampling_arguments(p)
    add_device_arguments(p)


def run(args) -> int:
    datasets = check_args(args)
    model = load_for_inference(args.model, args)
    code = 0
    if datasets:
        code = _validate(model, datasets, args)
    if args.chat:
        start_chat(model, args.model, args)
    return code


def _validate(model, datasets: dict[str, str], args) -> int:
    baseline_path, baseline_name = baseline_plan(args.model, args.baseline)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    args.seq_len = seq_len_for(model, args.seq_len)
    check_seq_len(model, args.seq_len, "model")
    baseline = None
    if baseline_path is not None:
        base_tok = load_tokenizer(baseline_path, trust_remote_code=args.trust_remote_code, what="--baseline")
        if tokenizer_fingerprint(base_tok) != tokenizer_fingerprint(tokenizer):
            raise NexusError(f"--baseline {baseline_path}: its tokenizer differs from the model's; perplexity and "
                             f"KL must be measured on the same tokens")
        baseline = load_for_inference(baseline_path, args, what="--baseline")
        check_seq_len(baseline, args.seq_len, "baseline")
    note = "a separately loaded model" if baseline is not None else "the same weights with the shared experts off"
    print(f"baseline: {baseline_name} ({note})", file=sys.stderr)
    results = {}
    for name, path in datasets.items():
        seqs = sequences(path, tokenizer, args.seq_len, args.num_samples, args.pack, args.text_field)
        if len(seqs) < args.num_samples:
            print(f"{name}: {path} gives {len(seqs)} sequences (fewer than --num-samples {args.num_samples})",
                  file=sys.stderr)
        with bar(sum(len(s) for s in seqs), name, unit="tok") as progress:
            results[name] = evaluate(model, batches(seqs, args.batch_size, tokenizer.pad_token_id), baseline,
                                     compute_perplexity=args.compute_perplexity, progress=progress.update)
    del baseline
    report = build_report(_display(args.model), baseline_name, results)
    for name, d in report["datasets"].items():
        bad = sorted(k for k, v in d.items() if isinstance(v, float) and not math.isfinite(v))
        if bad:
            raise NexusError(f"--dataset {name}: {', '.join(bad)} came out NaN or infinite (the model or its "
                             f"baseline gives non-finite logits); no report written")
    out = write_report(report, args.output, args.excellent_threshold, args.fail_threshold, args.overwrite,
                       baseline_note=note)
    for name, d in report["datasets"].items():
        ppl = "" if d["perplexity"] is None else (
            f"perplexity {d['perplexity']:.4f} vs {d['baseline_perplexity']:.4f} ({d['degradation_pct']:+.2f} %, "
            f"{verdict(d['degradation_pct'], args.excellent_threshold, args.fail_threshold)}), ")
        print(f"{name}: {d['tokens']:,} tokens, {ppl}KL {d['kl']:.3e}")
    overall = overall_verdict(report, args.excellent_threshold, args.fail_threshold)
    print(f"wrote {out}/report.json, report.md and plots/" + (f" — verdict: {overall}" if overall else ""))
    return 1 if args.fail_on_degradation and overall == FAIL else 0
