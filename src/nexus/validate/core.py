"""The run of `nexus validate` (see `nexus.validate.cli`): held-out sequences, the baseline, the report.

`sequences` cuts a dataset into evaluation sequences, `baseline_plan` decides whether the baseline is
the model itself with its shared experts off or a separately loaded model, and `validate_model`
measures (`metrics.evaluate`) and writes the report (`report`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import dist
from ..adapter import is_adapter_dir, read_adapter_config, resolve_base
from ..data import check_seq_len, iter_documents, load_tokenizer, pad_batch, tokenizer_fingerprint
from ..defaults import seq_len_for
from ..device import load_for_inference, load_sharded_for_inference
from ..errors import NexusError
from ..fsutil import same_path
from ..packing import iter_pieces
from ..progress import bar
from .metrics import evaluate
from .report import FAIL, build_report, overall_verdict, verdict, write_report


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


def display_path(path: str) -> str:
    """A path as reports show it: resolved when it exists, else as given (a hub name)."""
    p = Path(path)
    return str(p.resolve()) if p.exists() else path


def baseline_plan(model: str, baseline: str | None) -> tuple[str | None, str]:
    """(separate baseline to load, or None to run `model` with its shared experts off; baseline name)."""
    if is_adapter_dir(model):
        base = resolve_base(Path(model), read_adapter_config(model).base_model_name_or_path)
        if baseline is None or same_path(baseline, base):
            return None, display_path(base)
    elif baseline is None:
        raise NexusError(f"--model {model} is not a NEXUS adapter, so it has no base to compare with; "
                         f"pass --baseline")
    return baseline, display_path(baseline)


def validate_model(model, datasets: dict[str, str], args, root=None) -> int:
    """Measure `model` against its baseline on each dataset and write the report, as `nexus validate`
    describes; `args` holds its options (flags already checked). Returns the exit code (1: a fail verdict
    with --fail-on-degradation).

    `root`: the FSDP2 root of a sharded `model` (--shard-base, under torchrun; every rank calls this): a
    separate baseline is loaded sharded too, the batches are spread over the ranks and rank 0 writes."""
    baseline_path, baseline_name = baseline_plan(args.model, args.baseline)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    args.seq_len = seq_len_for(model, args.seq_len)
    check_seq_len(model, args.seq_len, "model")
    baseline, baseline_root = None, None
    main = dist.is_main() or root is None
    if baseline_path is not None:
        base_tok = load_tokenizer(baseline_path, trust_remote_code=args.trust_remote_code, what="--baseline")
        if tokenizer_fingerprint(base_tok) != tokenizer_fingerprint(tokenizer):
            raise NexusError(f"--baseline {baseline_path}: its tokenizer differs from the model's; perplexity and "
                             f"KL must be measured on the same tokens")
        if root is not None:
            baseline, baseline_root = load_sharded_for_inference(baseline_path, args, what="--baseline")
        else:
            baseline = load_for_inference(baseline_path, args, what="--baseline")
        check_seq_len(baseline, args.seq_len, "baseline")
    note = "a separately loaded model" if baseline is not None else "the same weights with the shared experts off"
    if main:
        print(f"baseline: {baseline_name} ({note})", file=sys.stderr)
    results = {}
    for name, path in datasets.items():
        seqs = sequences(path, tokenizer, args.seq_len, args.num_samples, args.pack, args.text_field)
        if len(seqs) < args.num_samples and main:
            print(f"{name}: {path} gives {len(seqs)} sequences (fewer than --num-samples {args.num_samples})",
                  file=sys.stderr)
        with bar(sum(len(s) for s in seqs), name, unit="tok") as progress:
            results[name] = evaluate(model, batches(seqs, args.batch_size, tokenizer.pad_token_id), baseline,
                                     compute_perplexity=args.compute_perplexity, progress=progress.update,
                                     root=root, baseline_root=baseline_root)
    del baseline, baseline_root
    report = build_report(display_path(args.model), baseline_name, results)
    for name, d in report["datasets"].items():
        bad = sorted(k for k, v in d.items() if isinstance(v, float) and not math.isfinite(v))
        if bad:
            raise NexusError(f"--dataset {name}: {', '.join(bad)} came out NaN or infinite (the model or its "
                             f"baseline gives non-finite logits); no report written")
    overall = overall_verdict(report, args.excellent_threshold, args.fail_threshold)
    code = 1 if args.fail_on_degradation and overall == FAIL else 0
    if not main:  # sharded: every rank has the same totals; rank 0 writes
        dist.barrier()
        return code
    out = write_report(report, args.output, args.excellent_threshold, args.fail_threshold, args.overwrite,
                       baseline_note=note)
    for name, d in report["datasets"].items():
        ppl = "" if d["perplexity"] is None else (
            f"perplexity {d['perplexity']:.4f} vs {d['baseline_perplexity']:.4f} ({d['degradation_pct']:+.2f} %, "
            f"{verdict(d['degradation_pct'], args.excellent_threshold, args.fail_threshold)}), ")
        print(f"{name}: {d['tokens']:,} tokens, {ppl}KL {d['kl']:.3e}")
    print(f"wrote {out}/report.json, report.md and plots/" + (f" — verdict: {overall}" if overall else ""))
    if root is not None:
        dist.barrier()  # the others end once the report is written
    return code
