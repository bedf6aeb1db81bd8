"""Write small checkpoints in the block-FP8 layouts of DeepSeek-V3 and Qwen3-*-FP8 (tests, benchmarks).

    write_checkpoint("tiny-qwen3-fp8/", model.config, fp8_tensors(model, "per_expert", (16, 16)),
                     quantization_config=fp8_quantization_config(model, (16, 16)), first_shard=1)

Two layouts (one layer of a Qwen3-MoE model, H hidden, I expert width, E experts, b = weight_block_size):

per_expert — as DeepSeek-V3 and Qwen3-30B-A3B-FP8 ship (and as transformers loads them):
    model.layers.L.mlp.experts.{j}.gate_proj.weight            F8_E4M3 [I, H]
    model.layers.L.mlp.experts.{j}.gate_proj.weight_scale_inv  F32     [ceil(I/b0), ceil(H/b1)]
    (up_proj likewise; down_proj [H, I] with [ceil(H/b0), ceil(I/b1)])
fused — the FP8 experts module's own parameters (transformers' `FP8Experts`, what a model quantized
in memory holds):
    model.layers.L.mlp.experts.gate_up_proj                    F8_E4M3 [E, 2I, H]
    model.layers.L.mlp.experts.gate_up_proj_scale_inv          F32     [E, ceil(2I/b0), ceil(H/b1)]
    model.layers.L.mlp.experts.down_proj / down_proj_scale_inv F8_E4M3 [E, H, I] / F32 [E, ceil(H/b0), ceil(I/b1)]

In both, every other nn.Linear (attention projections, DeepSeek's q_a/q_b/kv_a_proj_with_mqa/kv_b,
dense MLPs, shared experts) is `<module>.weight` F8_E4M3 + `<module>.weight_scale_inv` F32, as in the
released checkpoints. Kept unquantized, BF16 (what the releases store): embeddings, every norm
(input/post-attention, q/k norms, DeepSeek's q_a/kv_a layernorms, the final norm), the routers
(`mlp.gate.weight`; transformers builds them as router modules, not nn.Linear, so its FP8 quantizer
never converts them) and `lm_head` (transformers' quantizer always skips the output embeddings);
DeepSeek's `mlp.gate.e_score_correction_bias` stays F32, as released. The rule is transformers' own
(`replace_with_fp8_linear`: `.experts` modules and exact nn.Linear, minus `get_keys_to_not_convert`).

Assumptions (no hub access here; from the published configs as known, not re-checked):
DeepSeek-V3's quantization_config is {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method":
"fp8", "weight_block_size": [128, 128]} with no `modules_to_not_convert`; Qwen3-*-FP8 add a
`modules_to_not_convert` list naming lm_head, the embeddings, norms and each layer's `mlp.gate`
(`fp8_quantization_config(model, qwen_style=True)` writes such a list). Those entries name modules
the rule above leaves unquantized anyway.

Note: what transformers 5.24 itself *writes* (`save_pretrained` of a model quantized with
FineGrainedFP8Config) is neither layout: the reverse conversion splits the expert weights per
expert but leaves the scales fused (`mlp.experts.gate_up_proj_scale_inv` [E, ., .]), and its own
dequantized load then drops those scales as unexpected keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from ..base import fp8

LAYOUTS = ("per_expert", "fused")
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": list(fp8.BLOCK_SIZE)}  # DeepSeek-V3's, verbatim
_KEEP_FP32 = ("e_score_correction_bias",)  # stored F32 in DeepSeek-V3
_PER_EXPERT = re.compile(r"^(.*\.experts)\.\d+\.")


def fp8_quantization_config(model=None, block_size=fp8.BLOCK_SIZE, qwen_style: bool = False) -> dict:
    """config.json's `quantization_config`: DeepSeek-V3's, with `weight_block_size` = `block_size`;
    `qwen_style` adds a Qwen3-*-FP8-like `modules_to_not_convert` (lm_head, embeddings, norms, routers)."""
    cfg = dict(FP8_QUANTIZATION_CONFIG, weight_block_size=list(block_size))
    if qwen_style:
        skip = ["lm_head", "model.embed_tokens", "model.norm"]
        for i in range(model.config.num_hidden_layers):
            skip += [f"model.layers.{i}.{m}" for m in ("input_layernorm", "post_attention_layernorm", "mlp.gate",
                                                       "self_attn.q_norm", "self_attn.k_norm")]
        cfg["modules_to_not_convert"] = skip
    return cfg


def fp8_modules(model) -> tuple[set[str], set[str]]:
    """(nn.Linear module paths, experts module paths) that transformers' FP8 quantizer converts."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model)
    linears, experts = set(), set()
    for name, module in model.named_modules():
        if not should_convert_module(name, skip):
            continue
        if name.endswith(".experts"):
            experts.add(name)
        elif type(module) is torch.nn.Linear:
            linears.add(name)
    return linears, experts


def fp8_tensors(model, layout: str = "per_expert", block_size=fp8.BLOCK_SIZE) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint tensors of an in-memory model in one of the FP8 `LAYOUTS` (see the module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    linears, experts = fp8_modules(model)
    for path in experts:
        module = model.get_submodule(path)
        if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
            raise ValueError(f"{path}: FP8 experts are stored [E, out, in] without biases; this family's "
                             f"experts are transposed or biased")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if layout == "per_expert":
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, dict(state))  # fused experts -> experts.{j}.<proj>.weight
    for name, t in state.items():
        stem, _, leaf = name.rpartition(".")
        match = _PER_EXPERT.match(name)
        quantize = t.dim() >= 2 and (
            (leaf == "weight" and (stem in linears or (match is not None and match.group(1) in experts)))
            or (layout == "fused" and stem in experts))
        if not quantize:
            yield name, t.to(torch.float32 if leaf in _KEEP_FP32 else torch.bfloat16)
            continue
        if layout == "fused" and stem in experts and any(n % b for n, b in zip(t.shape[-2:], block_size)):
            raise ValueError(f"{name} {tuple(t.shape)}: fused FP8 experts need whole {tuple(block_size)} "
                             f"blocks (transformers' FP8Experts sizes its gate_up scales otherwise)")
        weight, scale_inv = fp8.encode(t, block_size)
        yield name, weight
        yield (f"{stem}.weight_scale_inv" if leaf == "weight" else f"{name}_scale_inv"), scale_inv
