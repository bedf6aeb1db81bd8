"""Where each routed-experts parameter of a model lives in its checkpoint, in any on-disk layout.

    sources = map_expert_sources(files.keys(), meta_model, find_moe_blocks(meta_model))
    sources["model.layers.3.mlp.experts.gate_up_proj"]   # FusedSource | Mxfp4Source | PerExpertSource

Layouts, as real checkpoints store them:

- fused 3-D tensors under the parameter's own name (bf16/fp32; what `save_pretrained` writes), and
  the same in fine-grained FP8 with a sibling `<param>_scale_inv` (what transformers writes for an
  FP8-quantized model);
- GPT-OSS MXFP4: `<param>_blocks` uint8 [E, out, in/32, 16] + `<param>_scales` uint8 [E, out, in/32];
- one 2-D tensor per expert (`mlp.experts.{j}.gate_proj.weight` for Qwen-MoE, OLMoE, DeepSeek;
  `block_sparse_moe.experts.{j}.w1.weight` for Mixtral), in FP8 with `...weight_scale_inv` beside
  each (DeepSeek-V3, Qwen3-*-FP8).

Key mapping is transformers' own: the model's conversion mapping (`conversion_mapping.py`) renames
each checkpoint key and tells which `WeightConverter` collects it; its operations
(`MergeModulelist(dim=0)`, then `Concatenate(dim=d)` over the source patterns in order) say how
expert j's 2-D pieces form its slice: concatenated along d-1 in source-pattern order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import NexusError

MXFP4_SUFFIXES = ("_blocks", "_scales")
SCALE_SUFFIX = "_scale_inv"  # fine-grained FP8: `weight_scale_inv` beside `weight`, `<param>_scale_inv` beside `<param>`
SUPPORTED_QUANTIZATION = ("mxfp4", "fp8")


@dataclass
class FusedSource:
    key: str  # [E, ...] in the parameter's layout (FP8: [E, out, in])
    scale: str | None = None  # FP8 `<key>_scale_inv` [E, ceil(out/bo), ceil(in/bi)]


@dataclass
class Mxfp4Source:
    blocks: str  # uint8 [E, out, in/32, 16]
    scales: str  # uint8 [E, out, in/32]


@dataclass
class PerExpertSource:
    parts: list[dict[int, str]] = field(default_factory=list)  # one per source pattern, in order: expert -> key
    concat_dim: int = 0  # dim of the 2-D per-expert pieces along which the parts are concatenated
    scales: list[dict[int, str]] | None = None  # FP8: `weight_scale_inv` keys, as `parts`


def quant_method(config) -> str | None:
    """`quantization_config.quant_method` of a transformers config, or None."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    return q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)


def quantization_config(config) -> dict:
    q = getattr(config, "quantization_config", None) or {}
    return dict(q) if isinstance(q, dict) else q.to_dict()


def _expert_index_regex(pattern: str) -> re.Pattern:
    # "mlp.experts.*.gate_proj.weight" -> r"mlp\.experts\.(\d+)\.gate_proj\.weight"
    return re.compile(re.escape(pattern).replace(re.escape("*."), r"(\d+)\.") + r"$")


def scale_key(key: str) -> str:
    """The FP8 scale tensor stored beside `key` (`x.weight` -> `x.weight_scale_inv`)."""
    return key + SCALE_SUFFIX


def map_expert_sources(keys: list[str], model, blocks) -> dict[str, object]:
    """{full parameter name: source} for every experts parameter of `blocks`, from checkpoint `keys`."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (Concatenate, MergeModulelist, WeightConverter, WeightRenaming,
                                                 apply_renamings, rename_source_key)

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta_sd = dict(model.named_parameters())
    prefix = model.base_model_prefix
    wanted = {f"{b.path}.{b.experts_name}.{p}" for b in blocks
              for p in (getattr(b.experts, "nexus_projections", None) or {}) } | \
        {f"{b.path}.{b.experts_name}.{p}" for b in blocks for p, _ in b.experts.named_parameters()}
    key_set = set(keys)
    sources: dict[str, object] = {}
    mx: dict[str, dict[str, str]] = {}
    for key in keys:
        if key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in key_set:
            continue  # an FP8 scale: found through its weight below
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
        if target not in meta_sd and key in meta_sd:  # transformers' loader does the same
            target, pattern = key, None
        if pattern is None:
            if target in wanted:
                sources[target] = FusedSource(key, scale_key(key) if scale_key(key) in key_set else None)
                continue
            for suffix in MXFP4_SUFFIXES:
                stem = target[: -len(suffix)]
                if target.endswith(suffix) and stem in wanted:
                    mx.setdefault(stem, {})[suffix] = key
            continue
        if target not in wanted:
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        ops = converter.operations
        if not (isinstance(ops[0], MergeModulelist) and ops[0].dim == 0 and
                (len(ops) == 1 or (len(ops) == 2 and isinstance(ops[1], Concatenate)))):
            raise NexusError(f"{key}: checkpoint conversion {[type(o).__name__ for o in ops]} for '{target}' is not "
                             f"supported (NEXUS handles per-expert tensors merged and concatenated)")
        m = _expert_index_regex(pattern).search(apply_renamings(key, renamings))
        if m is None:
            raise NexusError(f"{key}: cannot tell which expert this checkpoint tensor belongs to (pattern '{pattern}')")
        src = sources.setdefault(target, PerExpertSource(
            parts=[{} for _ in converter.source_patterns], concat_dim=ops[1].dim - 1 if len(ops) == 2 else 0))
        part = converter.source_patterns.index(pattern)
        src.parts[part][int(m.group(1))] = key
        if scale_key(key) in key_set:
            if src.scales is None:
                src.scales = [{} for _ in converter.source_patterns]
            src.scales[part][int(m.group(1))] = scale_key(key)
    for stem, pair in mx.items():
        if len(pair) != 2:
            raise NexusError(f"MXFP4 tensor '{stem}' has {sorted(pair)} in the checkpoint but not both "
                             f"_blocks and _scales")
        sources.setdefault(stem, Mxfp4Source(pair["_blocks"], pair["_scales"]))
    for name, src in sources.items():
        if isinstance(src, PerExpertSource) and src.scales is not None:
            for part, scales in zip(src.parts, src.scales):
                lacking = sorted(set(part) - set(scales))
                if lacking:
                    raise NexusError(f"checkpoint has FP8 scales for some experts of '{name}' but not for "
                                     f"experts {lacking[:5]} ({part[lacking[0]]} has no {SCALE_SUFFIX})")
    return sources
