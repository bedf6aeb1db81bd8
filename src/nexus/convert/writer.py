"""Write small checkpoints in GPT-OSS's real MXFP4 layout (for tests and benchmarks).

    write_checkpoint("tiny-gpt-oss/", model.config, gpt_oss_mxfp4_tensors(model), num_shards=2,
                     quantization_config=MXFP4_QUANTIZATION_CONFIG)

The layout mirrors the released gpt-oss checkpoints (see shared/reference/gpt-oss-20b): experts as
`mlp.experts.{gate_up,down}_proj_blocks` / `_scales` (uint8) with bf16 `_bias`, everything else bf16;
shards named `model-0000{i}-of-0000{n-1}.safetensors`, filled in key order up to a size limit (so a
layer may straddle two files, as in the real index); `model.safetensors.index.json` with
`metadata.total_size`; `quantization_config` in config.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..base import mxfp4
from ..base.files import INDEX_NAME

MXFP4_QUANTIZATION_CONFIG = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
    "quant_method": "mxfp4",
}
_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def gpt_oss_mxfp4_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint tensors of an in-memory GPT-OSS model: experts MXFP4-encoded, the rest bf16.

    An experts weight [E, in, out] is stored as blocks [E, out, in/32, 16] and scales [E, out, in/32].
    """
    for name, t in model.state_dict().items():
        stem, _, leaf = name.rpartition(".")
        if stem.endswith(".experts") and leaf in _EXPERT_WEIGHTS:
            blocks, scales = mxfp4.encode(t.transpose(1, 2))  # [E, out, in] -> packed along `in`
            yield f"{name}_blocks", blocks
            yield f"{name}_scales", scales
        else:
            yield name, t.detach().to(torch.bfloat16)


def _shard_name(i: int, n: int, first: int = 0) -> str:
    # the gpt-oss release numbers shards from 0 (model-00000-of-00002), DeepSeek and Qwen from 1 (model-00001-of-00003)
    return f"model-{i + first:05d}-of-{n - 1 + first:05d}.safetensors"


def write_checkpoint(directory: str | os.PathLike, config, tensors: Iterable[tuple[str, torch.Tensor]],
                     num_shards: int | None = None, max_shard_bytes: int | None = None,
                     total_bytes: int | None = None, quantization_config: dict | None = None,
                     first_shard: int = 0) -> list[Path]:
    """Write `tensors` (name, tensor) as a sharded safetensors checkpoint plus config.json.

    Shards are filled in order up to `max_shard_bytes` (or total / `num_shards`; pass `total_bytes`
    when `tensors` is a generator, so at most one shard is held in memory). Shards are numbered from
    `first_shard` (0 as in gpt-oss, 1 as in DeepSeek-V3 and Qwen3). Returns the shard paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if max_shard_bytes is None:
        if total_bytes is None:
            tensors = list(tensors)
            total_bytes = sum(t.numel() * t.element_size() for _, t in tensors)
        max_shard_bytes = -(-total_bytes // (num_shards or 1))
    parts: list[Path] = []
    weight_map: dict[str, int] = {}
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        nonlocal shard, size
        if shard:
            path = directory / f".part-{len(parts)}.safetensors"
            save_file(shard, str(path), metadata={"format": "pt"})
            parts.append(path)
            shard, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes and (num_shards is None or len(parts) < num_shards - 1):
            flush()
        shard[name] = t.contiguous()
        weight_map[name] = len(parts)
        size += nbytes
        total += nbytes
    flush()
    n = len(parts)
    final = []
    for i, path in enumerate(parts):
        final.append(directory / _shard_name(i, n, first_shard))
        os.replace(path, final[-1])
    index = {"metadata": {"total_size": total},
             "weight_map": {k: _shard_name(i, n, first_shard) for k, i in sorted(weight_map.items())}}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    cfg = config.to_dict()
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return final


def random_gpt_oss_mxfp4_tensors(config, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Random checkpoint tensors of a GPT-OSS `config` in the released layout, made one at a time.

    Nothing of the model is allocated (its shapes come from a meta-device build), so a full-size
    gpt-oss-20b/120b checkpoint can be written with memory for one tensor. Experts get random bytes
    and scales 2^-9..2^-5 (weights of magnitude ~0.01-0.2), norms ones, the rest normal(0, 0.02) in bf16.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.state_dict().items():
        stem, _, leaf = name.rpartition(".")
        if stem.endswith(".experts") and leaf in _EXPERT_WEIGHTS:
            e, d_in, d_out = p.shape  # GPT-OSS stores experts [E, in, out]
            groups = d_in // mxfp4.BLOCK_SIZE
            yield f"{name}_blocks", torch.randint(0, 256, (e, d_out, groups, mxfp4.BYTES_PER_BLOCK), generator=gen,
                                                  dtype=torch.uint8)
            yield f"{name}_scales", torch.randint(mxfp4.SCALE_BIAS - 9, mxfp4.SCALE_BIAS - 4, (e, d_out, groups),
                                                  generator=gen, dtype=torch.uint8)
        elif "norm" in leaf or "norm" in stem.rpartition(".")[2]:
            yield name, torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            yield name, (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)


def gpt_oss_mxfp4_nbytes(config) -> int:
    """Bytes of the checkpoint `random_gpt_oss_mxfp4_tensors(config)` yields (for `write_checkpoint(total_bytes=)`)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = 0
    for name, p in model.state_dict().items():
        stem, _, leaf = name.rpartition(".")
        if stem.endswith(".experts") and leaf in _EXPERT_WEIGHTS:
            total += p.numel() // 2 + p.numel() // mxfp4.BLOCK_SIZE  # 4-bit values + one scale per 32
        else:
            total += p.numel() * 2
    return total
