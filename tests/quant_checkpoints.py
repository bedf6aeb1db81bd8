"""Miniature quantized checkpoints in the released layouts, and transformers' dequantized view of them.

    model = write_fp8_checkpoint("qwen3_moe", d, layout="per_expert")   # the in-memory fp32 original
    ref = load_dequantized_reference(d)                                 # what transformers makes of d

Every directory also holds the tiny tokenizer (tiny.save_tokenizer), so CLI tests can use it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from conftest import tiny_model
from safetensors import safe_open
from tiny import save_tokenizer

from nexus.convert.fp8_writer import fp8_quantization_config, fp8_tensors
from nexus.convert.writer import MXFP4_QUANTIZATION_CONFIG, gpt_oss_mxfp4_tensors, write_checkpoint

GPT_OSS_MXFP4 = dict(intermediate_size=64)  # MXFP4 packs blocks of 32; hidden 32 != intermediate 64
FP8_BLOCK = (16, 16)  # hidden 32 and widths 16/48/64 span several blocks; the released 128 would be one


def write_mxfp4_gpt_oss(directory, seed=0):
    """A miniature gpt-oss checkpoint in the released layout: MXFP4 experts, bf16 rest, 2 shards + index."""
    model = tiny_model("gpt_oss", seed=seed, **GPT_OSS_MXFP4)
    write_checkpoint(directory, model.config, gpt_oss_mxfp4_tensors(model), num_shards=2,
                     quantization_config=MXFP4_QUANTIZATION_CONFIG)
    save_tokenizer(directory)
    return model


def write_fp8_checkpoint(family, directory, layout="per_expert", seed=0, block=FP8_BLOCK, prepare=None, **overrides):
    """A miniature block-FP8 checkpoint of `family` (see nexus.convert.fp8_writer), 2 shards numbered from 1
    as DeepSeek-V3 / Qwen3 number theirs. Returns the in-memory fp32 model it was written from.

    Note: the default tiny deepseek_v3 has kv_a_proj_with_mqa of 16 + 8 = 24 rows, a partial 16-row tile,
    as the real one's 576 rows are on 128 (see load_dequantized_reference).
    """
    model = tiny_model(family, seed=seed, **overrides)
    if prepare is not None:  # e.g. give buffers the checkpoint stores values their init does not have
        prepare(model)
    write_checkpoint(directory, model.config, fp8_tensors(model, layout, block), num_shards=2, first_shard=1,
                     quantization_config=fp8_quantization_config(model, block, qwen_style=family.startswith("qwen")))
    save_tokenizer(directory)
    return model


def fp8_scaled_tensors(directory) -> dict[str, tuple[str, tuple, tuple]]:
    """weight key -> (scale key, weight shape, scale shape) for every FP8 tensor of a checkpoint directory."""
    directory = Path(directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    shapes = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(directory / shard), "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    out = {}
    for key, shape in shapes.items():
        if key.endswith("_scale_inv"):
            # `x.weight_scale_inv` -> `x.weight`; `x.gate_up_proj_scale_inv` -> `x.gate_up_proj`
            weight = key[: -len("_scale_inv")]
            out[weight] = (key, shapes[weight], shape)
    return out


def _needs_quantized_load(directory, block) -> bool:
    """transformers' dequantize=True load is wrong for this directory: fused FP8 experts (their
    `<param>_scale_inv` is dropped as an unexpected key) or partial tiles (mis-scaled, or a ValueError)."""
    for weight, (_, shape, _) in fp8_scaled_tensors(directory).items():
        if not weight.endswith(".weight") or any(n % b for n, b in zip(shape[-2:], block)):
            return True
    return False


@contextlib.contextmanager
def _cpu_fp8_load():
    """Let transformers load FP8 tensors as FP8 on CPU: its environment check (a GPU is needed to *run*
    FP8 matmuls) would otherwise switch to dequantize=True. Loading itself runs no kernel."""
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    saved = FineGrainedFP8HfQuantizer.validate_environment
    FineGrainedFP8HfQuantizer.validate_environment = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        FineGrainedFP8HfQuantizer.validate_environment = saved


def load_fp8_quantized(directory):
    """transformers' FP8 model of `directory` as loaded on a GPU (FP8Linear / FP8Experts holding the bytes), on CPU."""
    from transformers import AutoModelForCausalLM

    with _cpu_fp8_load():
        return AutoModelForCausalLM.from_pretrained(directory)


def load_dequantized_reference(directory, dtype=torch.float32, path="auto"):
    """transformers' dequantized model of an MXFP4 or block-FP8 checkpoint directory.

    MXFP4: `from_pretrained(quantization_config=Mxfp4Config(dequantize=True))`.
    FP8, path="dequantize": `from_pretrained(quantization_config=FineGrainedFP8Config(dequantize=True))`
    (transformers' CPU path; `Fp8Dequantize` dequantizes each stored weight at load).
    FP8, path="quantized": transformers loads the FP8 bytes and scales into FP8Linear / FP8Experts
    (its GPU path, here on CPU) and each is dequantized with transformers' `_dequantize_fp8_weight`
    into the plain model. "auto" takes "dequantize" unless that one is wrong for the directory:
    fused FP8 experts or partial tiles (see _needs_quantized_load).
    """
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    config = json.loads((Path(directory) / "config.json").read_text())
    quant = config.get("quantization_config", {})
    if quant.get("quant_method") == "mxfp4":
        return AutoModelForCausalLM.from_pretrained(directory, quantization_config=Mxfp4Config(dequantize=True),
                                                    dtype=dtype)
    if quant.get("quant_method") != "fp8":
        raise ValueError(f"{directory}: not an MXFP4 or FP8 checkpoint ({quant.get('quant_method')})")
    block = tuple(quant["weight_block_size"])
    if path == "auto":
        path = "quantized" if _needs_quantized_load(directory, block) else "dequantize"
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=FineGrainedFP8Config(dequantize=True),
                                                 dtype=dtype)
    if path == "dequantize":
        return model
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    quantized = load_fp8_quantized(directory)
    with torch.no_grad():
        for name, param in quantized.named_parameters():
            if param.dtype == torch.float8_e4m3fn:
                module_path, _, leaf = name.rpartition(".")
                module = quantized.get_submodule(module_path)
                scale = getattr(module, "weight_scale_inv" if leaf == "weight" else f"{leaf}_scale_inv")
                value = _dequantize_fp8_weight(param, scale, list(module.block_size), torch.float32).to(dtype)
                target = model.get_parameter(name)
                assert target.shape == value.shape, (name, target.shape, value.shape)
                target.copy_(value)
    return model
