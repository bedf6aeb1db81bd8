"""Loading the frozen base: path checks, and NEXUS's own loader for quantized checkpoints.

    model = load_base_model("gpt-oss-120b/", dtype="auto", device_map={"": "cuda:0"})
    model = load_base_model("gpt-oss-120b/", dequantize=True)     # transformers' dequantized load instead

An unquantized checkpoint loads through transformers' `from_pretrained`, as before. A quantized one
(MXFP4 as gpt-oss ships it, fine-grained FP8 as DeepSeek-V3 and Qwen3-*-FP8 ship it) loads here:

1. the model is built from its config with every parameter on the meta device (buffers, such as
   rotary tables, are computed for real);
2. each routed-experts module whose weights the checkpoint stores quantized becomes a
   `Quantized<Family>` module holding the packed bytes (`nexus.base.quantized`);
3. every parameter is allocated empty on the target device, then filled (`nexus.base.fill.FillPlan`) by streaming the
   safetensors shards one file at a time (plain file reads, no memory maps). Non-expert
   weights load in the requested dtype; non-expert FP8 linears are dequantized to it.

With `--shard-base` (any checkpoint, quantized or not) the same plan fills a sharded model instead:
`build_on_meta` stops after step 2, `nexus.sharding.shard_model` applies FSDP2, and
`materialize_sharded` has each rank read only the rows of each tensor it holds.

Peak memory is the finished model, never a dequantized copy of the experts. With `dequantize=True`
(`--dequantize` on the CLI) transformers' own dequantizing load is used instead (≈ 4× the
checkpoint for MXFP4). transformers' hub kernels are never requested.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..config import CONFIG_NAME  # an adapter directory stands where a model may
from ..errors import NexusError
from .cpu_matmul import compute_frozen_linears_in_fp32
from .files import SafetensorsDir
from .fill import FillPlan, is_quantized_source
from .quantized import MXFP4, Codec, fp8_codec, is_quantized_experts, quantize_experts
from .sources import SUPPORTED_QUANTIZATION, map_expert_sources, quant_method, quantization_config

log = logging.getLogger("nexus.base")
DEQUANTIZE_HELP = ("load a quantized base (MXFP4, FP8) dequantized by transformers instead of keeping its "
                   "packed weights (about 4x the memory for MXFP4; default: keep the checkpoint's quantization)")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPE_NAMES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def is_hub_name(path: str) -> bool:
    """`org/name` that is not a local path: no `.`, `/` or `~` start, and `org` is no local directory.

    A name like `runs/adapter` whose first part exists here is a (missing) local path, never a hub
    request: NEXUS goes to the network only for a name that cannot be meant locally.
    """
    if not HUB_NAME.match(path) or path.startswith((".", "~")):
        return False
    return not Path(path.split("/", 1)[0]).exists()


def check_model_path(path: str | os.PathLike, what: str = "--model", need_config: bool = True) -> str:
    """A local model directory (with config.json), or a hub name `org/name` the user asked for.

    `need_config=False` accepts any directory (a tokenizer directory holds no config.json).
    """
    p = Path(path)
    if p.is_dir():
        if need_config and not (p / "config.json").is_file() and not (p / CONFIG_NAME).is_file():
            raise NexusError(f"{what} {path}: directory holds no config.json (not a transformers model "
                             f"directory) and no {CONFIG_NAME} (not a NEXUS adapter)")
        return str(p)
    if p.exists():
        raise NexusError(f"{what} {path}: expected a model directory, got a file")
    if is_hub_name(str(path)):
        return str(path)  # a hub name: transformers resolves (and may download) it
    raise NexusError(f"{what} {path}: no such directory")


def check_model_type(path: str | os.PathLike, what: str = "--model", trust_remote_code: bool = False) -> None:
    """Refuse a local model whose config.json names a family this transformers does not know.

    Without this, transformers reports custom code or an unknown architecture in terms of
    repositories; the message here names the model type, the flag and what NEXUS supports.
    """
    config = Path(path) / "config.json"
    if not config.is_file():
        return
    try:
        cfg = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NexusError(f"{what} {path}: config.json is not valid JSON ({e})") from None
    check_config_model_type(cfg, f"{what} {path}", trust_remote_code)


def check_config_model_type(cfg: dict, where: str, trust_remote_code: bool = False) -> None:
    """The check of `check_model_type` on an already parsed config.json; `where` starts the message."""
    from transformers import CONFIG_MAPPING
    from transformers import __version__ as tf_version

    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if not model_type or model_type in CONFIG_MAPPING:
        return
    custom = "auto_map" in cfg
    if custom and trust_remote_code:
        return
    from ..moe import SUPPORTED_FAMILIES

    hint = ("; its config.json asks for custom modeling code (auto_map), which NEXUS runs only with "
            "--trust-remote-code, on the stages that offer it" if custom else "")
    raise NexusError(f"{where}: model_type '{model_type}' is not a model family transformers {tf_version} "
                     f"knows{hint}. Supported families: {', '.join(SUPPORTED_FAMILIES)}")


def stored_quantization(path: str | os.PathLike) -> dict:
    """The quantization_config a local model directory's config.json declares ({}: unquantized or not local)."""
    config = Path(path) / "config.json"
    try:
        q = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}
    return q if isinstance(q, dict) else {}


def load_base_model(path: str, dtype=None, device_map=None, trust_remote_code: bool = False, what="--model",
                    dequantize: bool = False) -> nn.Module:
    """Load a transformers causal LM, keeping quantized experts packed unless `dequantize`; errors name the path.

    Args:
        dtype: torch dtype of the non-quantized weights, "auto" or None (as stored).
        device_map: None (CPU), {"": device} or "auto" (from_pretrained's placement; unquantized or dequantized only).
    """
    path = check_model_path(path, what)
    check_model_type(path, what, trust_remote_code)
    q = stored_quantization(path)
    method = q.get("quant_method")
    if method is not None and method not in SUPPORTED_QUANTIZATION:
        raise NexusError(f"{what} {path}: '{method}' quantized checkpoints are not supported (NEXUS loads "
                         f"{', '.join(SUPPORTED_QUANTIZATION)} and unquantized checkpoints)")
    if method is not None and not dequantize:
        model = load_quantized(path, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code,
                               what=what)
    else:
        model = _from_pretrained(path, dtype, device_map, trust_remote_code, what, method, q)
    compute_frozen_linears_in_fp32(model)  # frozen bf16 linears on CPU: fp32 products (base.cpu_matmul)
    return model


def _from_pretrained(path: str, dtype, device_map, trust_remote_code: bool, what: str, method, q: dict) -> nn.Module:
    """transformers' own load; a quantized checkpoint (`--dequantize`) is dequantized, never run on hub kernels."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if method == "mxfp4":  # transformers would fetch Triton kernels on CUDA; ask for its dequantizing load
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    elif method == "fp8":
        from transformers import FineGrainedFP8Config

        kwargs["quantization_config"] = FineGrainedFP8Config(
            weight_block_size=tuple(q.get("weight_block_size") or (128, 128)), dequantize=True)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map,
                                                    trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        where = "" if Path(path).exists() else " (not a local directory; tried as a hub model name)"
        raise NexusError(f"{what} {path}: cannot load model{where} "
                         f"({type(e).__name__}: {str(e).splitlines()[0]})") from e


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with every parameter on the meta device and every buffer real (rotary tables etc.)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _target_device(device_map, what: str, path: str) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict) and set(device_map) == {""}:
        return torch.device(device_map[""])
    raise NexusError(f"{what} {path}: a quantized base loads onto one device (got device map {device_map!r}); "
                     f"pass --device cpu, cuda or cuda:N, or --dequantize to let transformers place a "
                     f"dequantized copy")


def stored_float_dtype(files: SafetensorsDir) -> torch.dtype:
    """The dtype most non-quantized float tensors of a checkpoint are stored in (what "auto" means)."""
    counts: dict[torch.dtype, int] = {}
    for info in files.tensors.values():
        if info.dtype in _DTYPE_NAMES:
            counts[_DTYPE_NAMES[info.dtype]] = counts.get(_DTYPE_NAMES[info.dtype], 0) + info.nbytes
    return max(counts, key=counts.get) if counts else torch.bfloat16


def _codec_for(method: str, q: dict, where: str) -> Codec:
    if method == "mxfp4":
        return MXFP4
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise NexusError(f"{where}: FP8 activation_scheme '{q.get('activation_scheme')}' is not supported "
                         f"(NEXUS loads weight-only fine-grained FP8: activation_scheme 'dynamic')")
    if q.get("weight_block_size") is None:
        raise NexusError(f"{where}: FP8 checkpoints without quantization_config.weight_block_size (per-tensor "
                         f"scales) are not supported; pass --dequantize")
    return fp8_codec(q["weight_block_size"])


def load_quantized(path: str, dtype=None, device_map=None, trust_remote_code: bool = False,
                   what: str = "--model") -> nn.Module:
    """A quantized checkpoint with its routed experts kept packed (see the module docstring)."""
    device = _target_device(device_map, what, path)
    model, plan = build_on_meta(path, dtype, trust_remote_code, what)
    plan.load(device)
    return _finish(model, plan, device)


def build_on_meta(path: str, dtype=None, trust_remote_code: bool = False,
                  what: str = "--model") -> tuple[nn.Module, FillPlan]:
    """The model of a local checkpoint with every parameter on the meta device, quantized experts in their
    packed form, and the plan that fills it (`FillPlan.load`, or `materialize_sharded` once sharded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where = f"{what} {path}"
    path = check_model_path(path, what)
    check_model_type(path, what, trust_remote_code)
    if not Path(path).is_dir():
        raise NexusError(f"{where}: a local model directory is needed here (hub names are not loaded this way)")
    files = SafetensorsDir(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise NexusError(f"{where}: cannot read config.json ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    method = quant_method(config)
    if method is not None and method not in SUPPORTED_QUANTIZATION:
        raise NexusError(f"{where}: '{method}' quantized checkpoints are not supported (NEXUS loads "
                         f"{', '.join(SUPPORTED_QUANTIZATION)} and unquantized checkpoints)")
    codec = _codec_for(method, quantization_config(config), where) if method else None
    if dtype in (None, "auto"):
        dtype = stored_float_dtype(files)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    from ..moe import find_moe_blocks

    blocks = find_moe_blocks(model)
    sources = map_expert_sources(files.keys(), model, blocks)
    plan = FillPlan(model, files, codec, where)
    for b in blocks:
        prefix = f"{b.path}.{b.experts_name}."
        params = [n for n, _ in b.experts.named_parameters()]
        quantized = {n: sources.get(prefix + n) for n in params if is_quantized_source(sources.get(prefix + n))}
        if not quantized:
            plan.add_unquantized_experts(prefix, params, sources)
            continue
        if len(quantized) != len([n for n in params if not n.endswith("_bias")]):
            raise NexusError(f"{where}: {prefix[:-1]} stores only some expert weights quantized "
                             f"({sorted(quantized)}); NEXUS needs all or none")
        quantize_experts(b.experts, codec, device="meta")
        for proj, src in quantized.items():
            plan.add_packed(prefix, proj, src, b.experts.nexus_projections[proj])
        for n in params:
            if n.endswith("_bias"):
                plan.add_unquantized_experts(prefix, [n], sources)
    plan.add_rest(sources)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config._name_or_path = str(path)
    return model, plan


def _finish(model: nn.Module, plan: FillPlan, device: torch.device) -> nn.Module:
    """After the fill: tied weights, the meta check, buffers on the device, frozen, eval, generation config."""
    from transformers import GenerationConfig

    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise NexusError(f"{plan.where}: the checkpoint lacks {len(missing)} parameters of the model "
                         f"(e.g. {', '.join(missing[:3])})")
    if device.type != "cpu":
        model.to(device)  # the buffers; parameters are there already
    for p in model.parameters():
        p.requires_grad_(False)
    path = model.config._name_or_path
    if (Path(path) / "generation_config.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    from ..moe import find_moe_blocks

    blocks = find_moe_blocks(model)
    n_quant = sum(is_quantized_experts(b.experts) for b in blocks)
    if plan.codec is not None:
        log.info("loaded %s: %d of %d MoE layers' experts kept in %s", path, n_quant, len(blocks), plan.codec.name)
    return model


@torch.no_grad()
def materialize_sharded(model: nn.Module, plan: FillPlan, device: torch.device) -> None:
    """Fill a model that `build_on_meta` made and `nexus.sharding.shard_model` sharded: each rank reads only
    the rows of each tensor it holds. Parameters that were real before sharding (the shared experts) and
    buffers (rotary tables) keep their values."""
    from ..sharding import local_rows

    kept = {n: local_rows(p)[0].clone() for n, p in model.named_parameters() if p.device.type != "meta"}
    buffers = dict(model.named_buffers())
    model.to_empty(device=device)
    for name, t in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = t.to(device)
    params = dict(model.named_parameters())
    for name, t in kept.items():
        local_rows(params[name])[0].copy_(t)
    planned = plan.load_sharded()
    missing = [n for n in params if n not in kept and n not in planned]
    if missing:
        raise NexusError(f"{plan.where}: the checkpoint lacks {len(missing)} parameters of the model "
                         f"(e.g. {', '.join(missing[:3])})")
    model.eval()


def packed_nbytes(model: nn.Module) -> int:
    """Bytes of the quantized experts' packed tensors in `model` (0 when none are quantized)."""
    return sum(p.numel() * p.element_size() for m in model.modules() if is_quantized_experts(m)
               for p in m.parameters(recurse=False) if not p.is_floating_point() or p.element_size() == 1)


def dequantized_nbytes(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """What the quantized experts of `model` would take dequantized to `dtype`."""
    total = 0
    for m in model.modules():
        if is_quantized_experts(m):
            total += sum(m.num_experts * o * i for o, i in m.nexus_projections.values()) * dtype.itemsize
    return total

