"""Precompute a teacher's top-k next-token log-probabilities over the training stream.

The sequences are the *training stream* (`nexus.stream`) with the same dataset, tokenizer,
--seq-len, packing and --seed as `nexus train`: cache row p holds the teacher's outputs for stream
position p, which is what training step s reads as positions s × G … (s + 1) × G − 1. Shards are
assigned round-robin to torchrun ranks; each is written atomically, and a rerun skips complete ones.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dist
from ..adapter import load_model, load_sharded_model
from ..base.loader import DEQUANTIZE_HELP
from ..data import check_seq_len, load_tokenizer, tokenizer_fingerprint
from ..defaults import SEQ_LEN_HELP, seq_len_for
from ..device import DTYPES, dtype_name, resolve_device, torch_dtype
from ..errors import NexusError
from ..flags import flag
from ..forward import (RouterCapture, backbone_of, check_head_split, default_chunk_size, hidden_states, lm_head_of,
                       vocab_size)
from ..fsutil import read_json
from ..moe import find_moe_blocks
from ..progress import bar, format_bytes
from ..sharding import SHARD_BASE_HELP
from ..stream import DataSpec, SequenceStream, build_sequences
from ..version import __version__
from . import cache as fmt

log = logging.getLogger("nexus.teacher")
DISK_MARGIN = 1.05  # refuse unless the disk has 5% more room than the remaining shards need


@dataclass
class PrecomputeConfig:
    """`nexus precompute-teacher` settings; each field is its flag (`nexus.flags`)."""

    model: str = flag(help="the teacher: a model directory (or an adapter directory)")
    dataset: str = flag(help="the training data, as given to `nexus train --dataset`")
    output: str = flag(help="cache directory")
    num_sequences: int | None = flag(None, "stream positions to store")
    num_steps: int | None = flag(None, "store --num-steps × --batch-size sequences")
    batch_size: int = flag(1, "sequences per forward, and per step for --num-steps")
    # None: from the model (nexus.defaults.seq_len_for)
    seq_len: int | None = flag(None, f"tokens per sequence; must equal train's --seq-len {SEQ_LEN_HELP}")
    top_k: int = flag(64, "log-probabilities stored per position")
    router_topk: int | None = flag(None, "also store the top-R router log-probs of every MoE layer "
                                         "(for --router-kl-weight and router metrics offline)")
    seed: int = flag(0, "data order; must equal train's --seed")
    pack: bool = flag(True, "as train's --no-pack", negate="--no-pack")
    text_field: str = flag("text", 'record field holding the text (chat records use "messages")')
    split: str | None = flag(None, "split of a saved Hugging Face dataset (default: train)")
    shard_size: int = flag(1024, "sequences per shard")
    device: str | None = flag(None, "cpu, cuda or cuda:N (default: cuda if available); under torchrun, each rank's GPU")
    dtype: str = flag("auto", "dtype of the teacher weights (default: as stored)", type=dtype_name,
                      metavar="{" + ",".join(DTYPES) + "}")
    dequantize: bool = flag(False, DEQUANTIZE_HELP)
    shard_base: bool = flag(False, SHARD_BASE_HELP)

    @property
    def total(self) -> int:
        return self.num_sequences if self.num_sequences is not None else self.num_steps * self.batch_size

    def check(self) -> None:
        if (self.num_sequences is None) == (self.num_steps is None):
            raise NexusError("pass exactly one of --num-sequences and --num-steps (× --batch-size)")
        for option, v in {"--batch-size": self.batch_size, "--top-k": self.top_k, "--shard-size": self.shard_size,
                        "--num-sequences / --num-steps": self.total}.items():
            if v < 1:
                raise NexusError(f"{option} must be at least 1, got {v}")
        if self.router_topk is not None and self.router_topk < 1:
            raise NexusError(f"--router-topk must be at least 1, got {self.router_topk}")
        if self.shard_base and self.dequantize:
            raise NexusError("--dequantize with --shard-base is not supported")


@torch.no_grad()
def teacher_topk(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, chunk: int,
                 capture: RouterCapture | None = None, router_k: int | None = None,
                 root: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Top-k log-probs at T = 1 of every position of a batch, padding zeroed. (B, L) -> (B, L, k) ×2 [+ router].

    `root`: the FSDP2 root of a sharded `model` (--shard-base): the forward runs through it, and its LM
    head stays gathered after it."""
    b, length = input_ids.shape

    def forward():
        if root is not None:
            return root(input_ids, attention_mask)  # (B, L, H)
        return hidden_states(backbone_of(model), input_ids, attention_mask)

    if capture is not None:
        with capture.recording() as router_logits:
            h = forward()  # (B, L, H)
    else:
        h = forward()
    head = lm_head_of(model)
    flat = h.reshape(-1, h.shape[-1])  # (B*L, H)
    values = torch.empty(flat.shape[0], k, dtype=torch.float16)
    indices = torch.empty(flat.shape[0], k, dtype=torch.int32)
    for start in range(0, flat.shape[0], chunk):
        sl = slice(start, start + chunk)
        logp = torch.log_softmax(head(flat[sl]).float(), dim=-1)  # (n, V)
        v, i = logp.topk(k, dim=-1)  # sorted, largest first
        values[sl], indices[sl] = v.half().cpu(), i.int().cpu()
    pad = ~attention_mask.reshape(-1).bool().cpu()  # (B*L,)
    values[pad], indices[pad] = 0, 0
    out = {"input_ids": input_ids.int().cpu(), "attention_mask": attention_mask.to(torch.uint8).cpu(),
           "topk_logprobs": values.view(b, length, k), "topk_indices": indices.view(b, length, k)}
    if capture is not None:
        lps, idxs = [], []
        for layer in sorted(router_logits):
            v, i = torch.log_softmax(router_logits[layer].float(), dim=-1).topk(router_k, dim=-1)  # (B*L, R)
            lps.append(v.half().cpu())
            idxs.append(i.to(torch.int16).cpu())
        lp, idx = torch.stack(lps, 1), torch.stack(idxs, 1)  # (B*L, layers, R)
        lp[pad], idx[pad] = 0, 0
        out["router_topk_logprobs"] = lp.view(b, length, *lp.shape[1:])
        out["router_topk_indices"] = idx.view(b, length, *idx.shape[1:])
    return out


def _forwards(cfg: PrecomputeConfig, shards: list[int]) -> int:
    """Forwards (batches) that writing `shards` takes."""
    return sum(math.ceil(min(cfg.shard_size, cfg.total - i * cfg.shard_size) / cfg.batch_size) for i in shards)


def precompute(cfg: PrecomputeConfig) -> Path:
    cfg.check()
    out = Path(cfg.output)
    fmt.check_output(out)
    dist.init(resolve_device(cfg.device))
    device = resolve_device(cfg.device)  # under torchrun: this rank's GPU
    rank, world = dist.rank(), dist.world_size()
    tokenizer = load_tokenizer(cfg.model, what="--model")
    cfg.seq_len = seq_len_for(cfg.model, cfg.seq_len)
    spec = DataSpec(dataset=str(Path(cfg.dataset).resolve()), seq_len=cfg.seq_len, pack=cfg.pack, seed=cfg.seed,
                    text_field=cfg.text_field, split=cfg.split)
    seqs = build_sequences(spec, tokenizer)
    stream = SequenceStream(seqs, cfg.seed)
    root = None
    if cfg.shard_base:  # every forward goes through the FSDP2 root, and every rank runs as many
        model, root = load_sharded_model(cfg.model, device, dtype=torch_dtype(cfg.dtype))
        model.eval()
    else:
        model = load_model(cfg.model, dtype=torch_dtype(cfg.dtype), dequantize=cfg.dequantize,
                           device_map={"": str(device)} if device.type == "cuda" else None).to(device).eval()
    check_seq_len(model, cfg.seq_len, "model")
    check_head_split(model, device, root)
    vocab = vocab_size(model)
    if cfg.top_k > vocab:
        raise NexusError(f"--top-k {cfg.top_k} is above the vocabulary size {vocab}")
    capture, layers = None, None
    if cfg.router_topk:
        blocks = find_moe_blocks(model)
        if cfg.router_topk > blocks[0].layout.num_experts:
            raise NexusError(f"--router-topk {cfg.router_topk} is above the {blocks[0].layout.num_experts} experts")
        capture, layers = RouterCapture(model, blocks), [b.layer for b in blocks]

    teacher = Path(cfg.model).resolve() if Path(cfg.model).exists() else cfg.model
    header = {"teacher_model": str(teacher), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
              "vocab_size": vocab, "seq_len": cfg.seq_len, "top_k": cfg.top_k, "router_topk": cfg.router_topk,
              "moe_layers": layers, "num_sequences": cfg.total, "shard_size": cfg.shard_size,
              "logprob_temperature": 1.0, "data": spec.describe(), "data_fingerprint": seqs.fingerprint(),
              "bytes_per_token": fmt.bytes_per_token(cfg.top_k, len(layers or []), cfg.router_topk or 0),
              "nexus_version": __version__}
    if (out / fmt.MANIFEST).is_file():
        old = read_json(out / fmt.MANIFEST, "teacher cache manifest")
        if all(old.get(k) == v for k, v in header.items() if k != "nexus_version"):
            if rank == 0:
                print(f"{out}: cache already complete ({old['num_sequences']} sequences)")
            return out
        raise NexusError(f"--output {out}: holds a complete teacher cache made with other settings")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        fmt.check_plan(out, header)
    dist.barrier()
    fmt.check_plan(out, header)  # every rank refuses a mismatched plan, not only rank 0

    num_shards = math.ceil(cfg.total / cfg.shard_size)
    done = fmt.completed_shards(out)
    todo = [i for i in range(num_shards) if i not in done]
    bpt = header["bytes_per_token"]
    need = sum(min(cfg.shard_size, cfg.total - i * cfg.shard_size) for i in todo) * cfg.seq_len * bpt
    if rank == 0:
        print(f"teacher cache: {cfg.total} sequences × {cfg.seq_len} positions, {bpt} bytes/token "
              f"(top-k {cfg.top_k}: k × 6 + 5{f' + router {len(layers)} × {cfg.router_topk} × 4' if layers else ''})"
              f" = {format_bytes(cfg.total * cfg.seq_len * bpt)} in {num_shards} shard(s); "
              f"{len(done)} already written, {format_bytes(need)} to write", flush=True)
    free = shutil.disk_usage(out).free
    if need * DISK_MARGIN > free:
        raise NexusError(f"--output {out}: the cache needs {format_bytes(need)} more, the disk has "
                         f"{format_bytes(free)} free")

    mine = [i for i in todo if i % world == rank]
    positions = sum(min(cfg.shard_size, cfg.total - i * cfg.shard_size) for i in mine) * cfg.seq_len
    with bar(positions, "precompute-teacher", unit="pos") as progress:  # this rank's share (rank 0 shows it)
        for i in mine:
            first = i * cfg.shard_size
            count = min(cfg.shard_size, cfg.total - first)
            parts = []
            for b0 in range(first, first + count, cfg.batch_size):
                ids, mask = stream.batch(range(b0, min(b0 + cfg.batch_size, first + count)))
                parts.append(teacher_topk(model, ids.to(device), mask.to(device), cfg.top_k,
                                          default_chunk_size(vocab), capture, cfg.router_topk, root))
                progress.update(ids.numel())
            tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            fmt.write_shard(out, i, first, tensors)
        if root is not None:  # as many forwards as the busiest rank (each gathers layers from all of them)
            with torch.no_grad():
                busiest = max(_forwards(cfg, [i for i in todo if i % world == r]) for r in range(world))
                one = torch.ones(1, 1, dtype=torch.long, device=device)  # (1, 1), discarded
                for _ in range(busiest - _forwards(cfg, mine)):
                    root(one, one)
    if capture is not None:
        capture.close()
    dist.barrier()
    if rank == 0:
        done = fmt.completed_shards(out)
        missing = [i for i in range(num_shards) if i not in done]
        if missing:
            raise NexusError(f"--output {out}: shards {missing[:5]} were not written; run again to complete")
        manifest = fmt.write_manifest(out, header, done)
        total_bytes = sum(e["bytes"] for e in manifest["shards"])
        print(f"wrote {out}: {cfg.total} sequences, {manifest['tokens']:,} tokens, {format_bytes(total_bytes)} "
              f"in {num_shards} shard(s)")
    dist.barrier()
    return out
