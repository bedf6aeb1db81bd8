"""Read one routed expert of one layer straight from a model's safetensors checkpoint.

    reader = ExpertReader("path/to/gpt-oss-120b")
    tensors = reader.read_expert(layer=3, expert=17)   # {"gate_up_proj": [H, 2I], "down_proj": [I, H], ...}

The result is expert j's slice of the family's fused experts parameters, in their in-memory layout
(what `model.layers[3].mlp.experts.gate_up_proj[17]` holds after `from_pretrained`), in fp32.
Nothing else is read. Three on-disk layouts, as real checkpoints store them:

- fused 3-D tensors under the parameter's own name (bf16/fp32; what GPT-OSS `save_pretrained` writes):
  expert j is the slice [j];
- GPT-OSS MXFP4: `<param>_blocks` uint8 [E, out, in/32, 16] + `<param>_scales` uint8 [E, out, in/32],
  decoded and transposed to the parameter's [in, out] (as transformers' `Mxfp4Dequantize` does);
- one 2-D tensor per expert (`mlp.experts.{j}.gate_proj.weight` for Qwen-MoE, OLMoE, DeepSeek;
  `block_sparse_moe.experts.{j}.w1.weight` for Mixtral): merged as transformers merges them.

Key mapping is transformers' own: the model's conversion mapping (`conversion_mapping.py`) renames
each checkpoint key and tells which `WeightConverter` collects it; its operations
(`MergeModulelist(dim=0)`, then `Concatenate(dim=d)` over the source patterns in order) say how
expert j's 2-D pieces form its slice: concatenated along d-1 in source-pattern order.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..base import mxfp4
from ..base.config import load_model_config
from ..base.files import SafetensorsDir
from ..base import fp8
from ..base.sources import (FusedSource, Mxfp4Source, PerExpertSource, map_expert_sources, quant_method,
                            quantization_config)
from ..errors import NexusError
from ..moe import find_moe_blocks


def meta_model(config):
    """The model built on the meta device: module paths and parameter shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


class ExpertReader:
    """Reads single experts of a model directory's checkpoint. Sizes come from the config.

    Attributes: `layers` (MoE decoder-layer indices), `blocks` {layer: MoEBlock on the meta model},
    `model` (the meta model), `config`, `files` (the `SafetensorsDir`), `experts_read`.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        self.config = load_model_config(self.model_dir, "--input")
        method = quant_method(self.config)
        if method not in (None, "mxfp4", "fp8"):
            raise NexusError(f"--input {self.model_dir}: '{method}' quantized checkpoints are not supported by convert "
                             f"(it reads bf16/fp16/fp32, MXFP4 and fine-grained FP8 experts); dequantize the model first")
        self.fp8_block = None
        if method == "fp8":
            block = quantization_config(self.config).get("weight_block_size")
            if block is None:
                raise NexusError(f"--input {self.model_dir}: FP8 without weight_block_size (per-tensor scales) is not "
                                 f"supported by convert")
            self.fp8_block = tuple(int(b) for b in block)
        self.model = meta_model(self.config)
        self.blocks = {b.layer: b for b in find_moe_blocks(self.model)}
        self.layers = sorted(self.blocks)
        self.files = SafetensorsDir(self.model_dir)
        self.sources = map_expert_sources(self.files.keys(), self.model, list(self.blocks.values()))
        self.experts_read = 0
        for b in self.blocks.values():
            for pname, p in b.experts.named_parameters():
                name = f"{b.path}.{b.experts_name}.{pname}"
                if name not in self.sources:
                    raise NexusError(f"{self.model_dir}: no checkpoint tensors for '{name}' (looked for the fused "
                                     f"tensor, MXFP4 {name}_blocks/_scales and per-expert tensors)")
                src = self.sources[name]
                if isinstance(src, PerExpertSource):
                    for part in src.parts:
                        missing = sorted(set(range(p.shape[0])) - set(part))
                        if missing:
                            raise NexusError(f"{self.model_dir}: checkpoint lacks experts {missing[:5]} of '{name}'")

    @property
    def num_experts(self) -> int:
        return self.blocks[self.layers[0]].layout.num_experts

    @property
    def bytes_read(self) -> int:
        return self.files.bytes_read

    def _param_keys(self, layer: int) -> list[tuple[str, str, object]]:
        if layer not in self.blocks:
            raise NexusError(f"layer {layer} is not an MoE layer of {self.model_dir} (MoE layers: {self.layers})")
        b = self.blocks[layer]
        return [(pname, f"{b.path}.{b.experts_name}.{pname}", p) for pname, p in b.experts.named_parameters()]

    def expert_nbytes(self, layer: int) -> int:
        """Bytes on disk of one expert of `layer` (what `read_expert` reads)."""
        total = 0
        for _, name, _ in self._param_keys(layer):
            src = self.sources[name]
            if isinstance(src, FusedSource):
                total += self.files.slice_nbytes(src.key, 0)
                total += self.files.slice_nbytes(src.scale, 0) if src.scale is not None else 0
            elif isinstance(src, Mxfp4Source):
                total += self.files.slice_nbytes(src.blocks, 0) + self.files.slice_nbytes(src.scales, 0)
            else:
                total += sum(self.files.slice_nbytes(part[0]) for part in src.parts)
                total += sum(self.files.slice_nbytes(s[0]) for s in src.scales) if src.scales is not None else 0
        return total

    def read_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Expert `expert` of MoE layer `layer`: {param name: fp32 tensor of the parameter's shape minus dim 0}.

        Tensors decoded from MXFP4 are transposed views (call `.contiguous()` if you need a copy).
        """
        params = self._param_keys(layer)
        if not 0 <= expert < self.blocks[layer].layout.num_experts:
            raise NexusError(f"expert {expert} out of range for layer {layer} "
                             f"({self.blocks[layer].layout.num_experts} experts)")
        out = {}
        for pname, name, param in params:
            src = self.sources[name]
            if isinstance(src, FusedSource) and src.scale is not None:  # FP8 [out, in] + its scale grid
                t = fp8.decode(self.files.read(src.key, expert), self.files.read(src.scale, expert), self.fp8_block)
                t = t.T if self.blocks[layer].layout.is_transposed else t
            elif isinstance(src, FusedSource):
                t = self.files.read(src.key, expert).float()
            elif isinstance(src, Mxfp4Source):
                blocks, scales = self.files.read(src.blocks, expert), self.files.read(src.scales, expert)
                try:
                    # [out, in] -> the parameter's [in, out], as a view: merging works on [out, in] rows
                    # (merge.to_units transposes back), so copying here would be two wasted transposes
                    t = mxfp4.decode(blocks, scales).T
                except ValueError as e:
                    raise NexusError(f"{self.files.tensors[src.blocks].file}: '{src.blocks}': {e}") from None
            elif src.scales is not None:  # FP8 per expert: each 2-D piece with its own scale grid
                pieces = [fp8.decode(self.files.read(part[expert]), self.files.read(scales[expert]), self.fp8_block)
                          for part, scales in zip(src.parts, src.scales)]
                t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=src.concat_dim)
            else:
                pieces = [self.files.read(part[expert]).float() for part in src.parts]
                t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=src.concat_dim)
            if tuple(t.shape) != tuple(param.shape[1:]):
                raise NexusError(f"{self.model_dir}: expert {expert} of '{name}' reads as {tuple(t.shape)} from the "
                                 f"checkpoint, the config implies {tuple(param.shape[1:])}")
            out[pname] = t
        self.experts_read += 1
        return out

    def release(self) -> None:
        """Drop the memory maps (call between layers to keep resident memory bounded)."""
        self.files.release()
