"""`--device` / `--dtype` flags shared by the inference verbs (validate, chat), and loading by them."""

from __future__ import annotations

import argparse

import torch

from .base.loader import DEQUANTIZE_HELP
from .errors import NexusError

# The one table of --dtype values, for every verb: "auto" keeps the checkpoint's stored dtype.
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def canonical_dtype(value: str) -> str:
    """A --dtype value (a name of DTYPES or an alias such as bf16) -> its name in DTYPES."""
    name = DTYPE_ALIASES.get(value, value)
    if name not in DTYPES:
        raise NexusError(f"--dtype must be one of {', '.join([*DTYPES, *DTYPE_ALIASES])}, got {value!r}")
    return name


def dtype_name(value: str) -> str:
    """`canonical_dtype` as an argparse `type`."""
    try:
        return canonical_dtype(value)
    except NexusError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--dtype ")) from None


def torch_dtype(value: str):
    """A --dtype value -> torch dtype, or "auto"."""
    return DTYPES[canonical_dtype(value)]


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N, or auto (spread over all GPUs with device_map='auto'); "
                        "default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", type=dtype_name, metavar="{" + ",".join(DTYPES) + "}",
                   help="dtype of the base weights (default auto: as stored in the checkpoint; quantized "
                        "experts stay packed); shared experts stay float32")
    p.add_argument("--dequantize", action="store_true", help=DEQUANTIZE_HELP)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom modeling code from the model directory (off by default)")


def resolve_device(name: str | None, flag: str = "--device") -> torch.device:
    """A `--device` value as a torch device: None or "auto" is cuda when available, else cpu; under
    torchrun, `cuda` means this rank's GPU once torch.distributed is up."""
    from . import dist

    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NexusError(f"{flag} {name}: not a device (expected cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NexusError(f"{flag} {name}: CUDA is not available on this machine")
    return dist.local_device(str(device))


def device_map(device: str | None):
    """The `device_map` for `from_pretrained` from a `--device` value ("auto": spread over all GPUs)."""
    if device == "auto":
        return "auto"
    dev = resolve_device(device)
    if dev.type == "cpu":
        return None  # from_pretrained's default placement
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    return {"": str(dev)}


def load_for_inference(path: str, args, what: str = "--model"):
    """An adapter (base + shared experts) or a plain model, placed and typed by --device/--dtype; eval mode.

    `what` names the flag in errors (e.g. "--baseline").
    """
    from .adapter import is_adapter_dir, load_model
    from .base.loader import load_base_model

    kwargs = dict(dtype=torch_dtype(args.dtype), device_map=device_map(args.device),
                  trust_remote_code=args.trust_remote_code, dequantize=getattr(args, "dequantize", False))
    if is_adapter_dir(path):
        model = load_model(path, **kwargs)
    else:
        model = load_base_model(path, what=what, **kwargs)
    return model.eval()


def load_sharded_for_inference(path: str, args, what: str = "--model"):
    """`load_for_inference` for `--shard-base` under torchrun: (model, FSDP2 root), eval mode, the base sharded
    over the ranks (`nexus.adapter.load_sharded_model`); every forward goes through the root."""
    from . import dist
    from .adapter import load_sharded_model

    device = resolve_device(args.device, "--device")
    dist.init(device)
    device = resolve_device(args.device, "--device")  # under torchrun: this rank's GPU
    model, root = load_sharded_model(path, device, dtype=torch_dtype(args.dtype),
                                     trust_remote_code=args.trust_remote_code, what=what)
    return model.eval(), root
