"""Router statistics: run the model over a sample and accumulate streaming statistics per MoE layer.

`collect` is the run of `nexus collect` (see `nexus.stats.cli.collect` for what it does and its
flags), `merge` its `--merge`. The partial state of an interrupted run sits beside the output
(`partial_path`) and records its data position, so a resumed run ends with the same statistics.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import dist
from ..data import check_seq_len, iter_documents, load_tokenizer, pad_batch
from ..defaults import seq_len_for
from ..device import resolve_device, torch_dtype
from ..errors import NexusError
from ..packing import iter_pieces
from ..progress import bar, format_bytes, rate
from ..moe import find_moe_blocks
from ..routing import router_hooks
from .accumulate import Collector, RouterStats
from .reservoir import RawReservoir, raw_path



def partial_path(output: str | Path) -> Path:
    """`router_stats.safetensors` -> `router_stats.partial.safetensors`."""
    p = Path(output)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.with_name(f"{stem}.partial.safetensors")


def iter_batches(texts, tokenizer, seq_len: int, batch_size: int, target_tokens: int = 0) -> Iterator[list[list[int]]]:
    """Batches of token-id sequences, in data order, holding `target_tokens` tokens in all (0: everything).

    Documents are chunked (nexus.packing) with pieces of a single token kept: a router sees every token.
    """
    budget = target_tokens if target_tokens > 0 else None
    batch: list[list[int]] = []
    for pieces in iter_pieces(texts, tokenizer, seq_len, pack=False, min_len=1):
        if budget is not None:
            pieces = pieces.limit_tokens(budget)
            budget -= int(pieces.lengths.sum())
        for seq in pieces.tolist():
            batch.append(seq)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if budget is not None and budget <= 0:
            break
    if batch:
        yield batch


def _forward(decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """One forward of the decoder stack (the LM head is not needed for router statistics)."""
    decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


@torch.no_grad()
def _pad_forwards(root: torch.nn.Module, batches: int, world: int, rank: int, device: torch.device) -> None:
    """Sharded (--shard-base): every forward gathers layers from all ranks, so a rank that had no batch in
    the last, incomplete round runs one forward of a token whose routing is not recorded (the router
    hooks are gone by now) and discarded."""
    last = batches % world
    if last and rank >= last:
        one = torch.ones(1, 1, dtype=torch.long, device=device)  # (1, 1)
        root(one, one)


def _experts_width(model: torch.nn.Module, blocks) -> tuple[int, torch.dtype]:
    """(width, dtype) of what the experts read: the hidden size of their layout, the dtype of the model's
    activations (its input embeddings)."""
    widths = {b.layout.hidden_size for b in blocks}
    if len(widths) != 1:
        raise NexusError(f"--keep-hidden: the MoE layers' experts read different widths {sorted(widths)}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = embeddings.weight.dtype if embeddings is not None else torch.float32
    return widths.pop(), dtype if dtype.is_floating_point else torch.float32


@contextlib.contextmanager
def experts_input_hooks(blocks, collector: Collector) -> Iterator[None]:
    """Pass what every MoE block's experts module reads to `collector.experts_input` (when it keeps hidden states)."""
    handles = []
    if collector.keeps_hidden:
        for b in blocks:
            def seen(module, args, kwargs, layer=b.layer):
                collector.experts_input(layer, args[0] if args else kwargs["hidden_states"])

            handles.append(b.experts.register_forward_pre_hook(seen, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def partial_description(partial: Path) -> str:
    from safetensors import safe_open

    try:
        with safe_open(str(partial), "pt") as f:
            return f"the statistics of the first {int((f.metadata() or {})['batches_done'])} batches"
    except Exception:  # unreadable: --resume names the problem
        return "the partial statistics"


def _device_and_dtype(args) -> tuple[torch.device, torch.dtype | str]:
    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype)  # auto: as stored: a bf16 checkpoint is not doubled to fp32 on CPU
    return device, dtype


def _reduced(stats: RouterStats, reservoir: RawReservoir | None):
    """The sums over all ranks (a copy; every rank calls this) and, on the main rank, the merged reservoir.

    The merge is built in host memory, one layer at a time: the device holds the running sample and one
    layer gathered from every rank, never a second copy of the whole sample (with --keep-hidden that is
    N x hidden size x layers values). Only the main rank writes it, so the others keep no copy.
    """
    total = stats.copy()
    total.load_flat_(dist.all_reduce_sum(total.flat()))
    merged = None
    if reservoir is not None:
        merged = reservoir.empty_like("cpu") if dist.is_main() else None
        for i in reservoir.moe_layers:
            hidden = dist.all_gather(reservoir.hidden[i]) if reservoir.hidden is not None else None
            for r, (keys, probs) in enumerate(zip(dist.all_gather(reservoir.keys[i]), dist.all_gather(reservoir.probs[i]))):
                if merged is not None:
                    merged.keep(i, keys, probs, hidden[r] if hidden is not None else None)
    return total, merged


def partial_raw_path(partial: Path, batches_done: int) -> Path:
    """The raw sample of a partial run at a data position: `x.partial.raw-{batches_done}.safetensors`."""
    stem = partial.name[: -len(".safetensors")] if partial.name.endswith(".safetensors") else partial.name
    return partial.with_name(f"{stem}.raw-{int(batches_done)}.safetensors")


def _partial_raws(partial: Path) -> list[Path]:
    stem = partial.name[: -len(".safetensors")] if partial.name.endswith(".safetensors") else partial.name
    return sorted(partial.parent.glob(f"{glob.escape(stem)}.raw-*.safetensors")) + [raw_path(partial)]


def _save(path: Path, stats: RouterStats, reservoir: RawReservoir | None, meta: dict | None = None) -> None:
    """Rank 0 writes (the raw sample first, then the statistics); every rank waits for it.

    A partial run's raw sample goes to a file named by its data position, which the statistics
    record; older ones are removed only once the statistics naming the new one are in place. So a
    kill at any point leaves statistics and a raw sample of the same batches.
    """
    if dist.is_main():
        raw = None
        if reservoir is not None:
            raw = raw_path(path) if meta is None else partial_raw_path(path, meta["batches_done"])
            reservoir.save(raw)
            if meta is not None:
                meta = dict(meta, raw=raw.name)
        else:
            raw_path(path).unlink(missing_ok=True)  # a raw sample left by an earlier run is not this one's
        stats.save(path, meta)
        if meta is not None:
            for old in _partial_raws(path):
                if old != raw:
                    old.unlink(missing_ok=True)
    dist.barrier()


def _check_finite(total: RouterStats, batches_done: int, partial: Path) -> None:
    """Stop before NaN/Inf sums are written: they would poison every later flush and the analysis."""
    bad = total.nonfinite()
    if bad is not None:
        kept = f"; {partial} (the last finite flush) is kept" if partial.is_file() else ""
        raise NexusError(f"layer {bad[0]}: router statistics ({bad[1]}) are NaN or infinite after batch "
                         f"{batches_done}: the model's router logits are not finite (damaged weights?){kept}")


def _resume_state(args, stats, reservoir, plan: dict) -> tuple[int, int]:
    """Load the partial run into rank 0's sums. Returns (batches done, tokens done)."""
    partial = partial_path(args.output)
    if not args.resume or not partial.is_file():
        if args.resume and dist.is_main():
            print(f"--resume: no {partial}, starting from the beginning")
        return 0, 0
    done, meta = RouterStats.load(partial)
    stats.check_compatible(done, what=f"--resume {partial} (this model: {stats.num_experts} experts)")
    recorded = json.loads(meta.get("plan", "{}"))
    changed = sorted(k for k in set(plan) | set(recorded) if recorded.get(k) != plan.get(k))
    if changed:
        raise NexusError(f"--resume {partial}: the partial run used other settings ("
                         + ", ".join(f"{k}: {recorded.get(k)!r} then, {plan.get(k)!r} now" for k in changed) + ")")
    raw = partial.with_name(meta["raw"]) if "raw" in meta else raw_path(partial)
    if reservoir is not None and not raw.is_file():
        raise NexusError(f"--resume {partial}: the partial run did not use --keep-raw ({raw} missing)")
    if dist.is_main():  # rank 0 holds the past; the reduction adds everyone's new tokens
        stats.merge_(done)
        if reservoir is not None:
            reservoir.merge_(RawReservoir.load(raw, reservoir.keys[reservoir.moe_layers[0]].device))
    return int(meta["batches_done"]), done.tokens


def merge(args) -> int:
    """`--merge A B ... --output C`: C holds the sums of A, B, ... (and their raw samples when all have one)."""
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise NexusError(f"--output {out} exists (pass --overwrite to replace it)")
    loaded = [RouterStats.load(p)[0] for p in args.merge]
    total = loaded[0]
    for path, other in zip(args.merge[1:], loaded[1:]):
        total.check_compatible(other, what=f"--merge {path} vs {args.merge[0]}")
        total.merge_(other)
    sources = sorted({s.source_model for s in loaded})
    total.source_model = sources[0] if len(sources) == 1 else "; ".join(sources)
    raws = [raw_path(p) for p in args.merge]
    raw = None
    if all(r.is_file() for r in raws):
        samples = [RawReservoir.load(r) for r in raws]
        if len({r.seed for r in samples}) < len(samples):
            print("note: some raw samples were drawn with the same --seed, so their random keys repeat and the "
                  "merged raw sample is not uniform; use a different --seed per shard")
        raw = samples[0]
        for other in samples[1:]:
            raw.merge_(other)
    elif any(r.is_file() for r in raws):
        print("note: only some inputs have a raw sample (*.raw.safetensors); the merge has none")
    if raw is not None:
        raw.save(raw_path(out))
    total.save(out)
    print(f"merged {len(loaded)} statistics files: {total.tokens:,} tokens, {len(total.moe_layers)} MoE layers x "
          f"{total.num_experts} experts -> {out}")
    return 0


def collect(args) -> int:
    """Collect router statistics as `nexus collect` describes; `args` holds its options (flags already checked)."""
    if args.resume and Path(args.output).is_file() and not partial_path(args.output).is_file():
        print(f"--resume: {args.output} is complete (no {partial_path(args.output)}); nothing to do")
        return 0
    if args.overwrite and not args.resume and int(os.environ.get("RANK", "0")) == 0:  # start over: drop a partial run
        partial = partial_path(args.output)
        for stale in (partial, *_partial_raws(partial)):
            stale.unlink(missing_ok=True)
    device, dtype = _device_and_dtype(args)
    distributed = dist.init(device)
    device = dist.local_device(str(device))
    tokenizer = load_tokenizer(args.tokenizer or args.model, args.trust_remote_code,
                               what="--tokenizer" if args.tokenizer else "--model", model_dir=not args.tokenizer)

    def texts():
        return (d.text for d in iter_documents(args.dataset, tokenizer, args.text_field, args.split))

    if next(texts(), None) is None:  # fail before loading the model or writing anything
        raise NexusError(f"--dataset {args.dataset}: no non-empty documents")
    from ..adapter import load_model, load_sharded_model

    root = None
    if getattr(args, "shard_base", False):  # every forward goes through the FSDP2 root
        model, root = load_sharded_model(args.model, device, dtype=dtype, trust_remote_code=args.trust_remote_code)
        model.eval()
    else:
        # On GPU, weights load straight onto this rank's device (quantized checkpoints stay quantized).
        device_map = {"": str(device)} if device.type == "cuda" else None
        model = load_model(args.model, dtype=dtype, device_map=device_map, trust_remote_code=args.trust_remote_code,
                           dequantize=args.dequantize).eval()
    args.seq_len = seq_len_for(model, args.seq_len)
    check_seq_len(model, args.seq_len, "model")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    stats = RouterStats.for_model(model, source_model=str(args.model), device=device)
    blocks = find_moe_blocks(model)
    reservoir = None
    if args.keep_raw:
        hidden_size, hidden_dtype = _experts_width(model, blocks) if args.keep_hidden else (0, torch.float32)
        reservoir = RawReservoir(stats.moe_layers, stats.num_experts, args.keep_raw, args.seed, device,
                                 hidden_size, hidden_dtype)
    plan = {"dataset": str(Path(args.dataset).resolve()), "text_field": args.text_field, "split": args.split,
            "seq_len": args.seq_len, "batch_size": args.batch_size, "target_tokens": args.target_tokens,
            "keep_raw": args.keep_raw, "seed": args.seed}
    if args.keep_hidden:  # absent from earlier partial runs' plans, which kept none
        plan["keep_hidden"] = True
    start_batch, tokens_before = _resume_state(args, stats, reservoir, plan)

    world, rank = dist.world_size(), dist.rank()
    partial = partial_path(args.output)
    collector = Collector(stats, reservoir)
    progress = bar(args.target_tokens or None, "collect", unit="tok", initial=tokens_before)
    t0, round_tokens, batches_done, new_tokens = time.perf_counter(), 0, start_batch, 0
    try:  # the bar is closed on errors too, so an error message starts on a line of its own
        with router_hooks(model, collector, blocks), experts_input_hooks(blocks, collector), torch.no_grad():
            for b, seqs in enumerate(iter_batches(texts(), tokenizer, args.seq_len, args.batch_size,
                                                  args.target_tokens)):
                if b < start_batch:
                    continue
                k = b - start_batch
                if k % world == rank:
                    ids, mask = pad_batch(seqs, tokenizer.pad_token_id)  # (B, L), (B, L)
                    collector.set_batch(mask, batch_index=b)
                    if root is None:
                        _forward(decoder, ids.to(device), mask.to(device))
                    else:
                        root(ids.to(device), mask.to(device))  # (B, L, H), unused
                round_tokens += sum(len(s) for s in seqs)
                batches_done = b + 1
                if (k + 1) % world == 0:  # every rank has finished this round of batches
                    progress.update(round_tokens)
                    new_tokens += round_tokens
                    round_tokens = 0
                    if ((k + 1) // world) % args.flush_every == 0:
                        total, raw = _reduced(stats, reservoir)
                        _check_finite(total, batches_done, partial)
                        _save(partial, total, raw, {"batches_done": batches_done, "plan": json.dumps(plan),
                                                    "world_size": world})
        progress.update(round_tokens)
        new_tokens += round_tokens
        if root is not None:
            _pad_forwards(root, batches_done - start_batch, world, rank, device)
    finally:
        progress.close()
    total, raw = _reduced(stats, reservoir)
    if total.tokens == 0:
        raise NexusError(f"--dataset {args.dataset}: no tokens to collect")
    _check_finite(total, batches_done, partial)
    _save(Path(args.output), total, raw)
    if dist.is_main():
        for stale in (partial, *_partial_raws(partial)):
            stale.unlink(missing_ok=True)
        elapsed = time.perf_counter() - t0
        short = "" if not args.target_tokens or total.tokens >= args.target_tokens else \
            f" (the dataset ran out before --target-tokens {args.target_tokens:,})"
        size = Path(args.output).stat().st_size
        print(f"collected router statistics of {total.tokens:,} tokens{short}: {len(total.moe_layers)} MoE layers x "
              f"{total.num_experts} experts (top-{total.top_k}), {rate(new_tokens / max(elapsed, 1e-9))} tok/s over "
              f"{world} process{'es' if world > 1 else ''} -> {args.output} ({format_bytes(size)})"
              + (f" + {raw_path(args.output)}" if raw is not None else ""))
    if distributed:
        dist.shutdown()
    return 0
