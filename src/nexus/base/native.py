"""The CPU decode kernels (`decode.c`: MXFP4 and block FP8), compiled once with the system C compiler and
loaded with ctypes.

    lib = native.library()          # None when there is no compiler (or NEXUS_NATIVE=0): callers fall back
    lib.nexus_mxfp4_bf16(blocks_ptr, scales_ptr, out_ptr, groups)
    lib.nexus_fp8_f32(weight_ptr, scale_inv_ptr, out_ptr, mats, rows, cols, block_rows, block_cols)

The shared object is cached under $NEXUS_CACHE (default $XDG_CACHE_HOME/nexus or ~/.cache/nexus), in
`native/`, named by a hash of the source, the compiler command and this CPU's model and flags (it is
built with -march=native, so a cache shared between machines never hands one a kernel for another).
It is written to a temporary name and renamed, so concurrent processes (DDP ranks) never load a
half-written file. The call releases the GIL (ctypes), so callers may split work across threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..fsutil import umask

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.c")
_FLAGS = (("-O3", "-march=native"), ("-O3",))  # -march=native first; some compilers (or CPUs) refuse it
_STATE: dict = {}


def cache_dir() -> Path:
    root = os.environ.get("NEXUS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nexus")
    return Path(root) / "native"


def _cpu_id() -> str:
    """This CPU's model and feature flags (Linux /proc/cpuinfo), else the platform's description."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
        return "\n".join(sorted(set(keep))) or platform.processor()
    except OSError:
        return platform.platform() + platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str, target: Path) -> Path | None:
    """Compile SOURCE to `target` (atomically); None if every flag set fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in _FLAGS:
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
        os.close(fd)
        cmd = [cc, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE), "-lm"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            proc = None
            errors.append(f"{' '.join(cmd)}: {e}")
        if proc is not None and proc.returncode == 0:
            os.chmod(tmp, 0o755 & ~umask())  # mkstemp made it 0600
            os.replace(tmp, target)
            return target
        if proc is not None:
            errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[:300]}")
        Path(tmp).unlink(missing_ok=True)
    log.warning("could not compile the CPU decode kernels (%s); decoding with numpy / torch instead (slower)", "; ".join(errors))
    return None


def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use, then cached); None if disabled or no compiler works."""
    if "lib" in _STATE:
        return _STATE["lib"]
    _STATE["lib"] = None
    if os.environ.get("NEXUS_NATIVE", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found (cc, gcc, clang or $CC): MXFP4 and FP8 decode with numpy / torch on CPU (slower)")
        return None
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), cc.encode(), repr(_FLAGS).encode(),
                                     _cpu_id().encode()])).hexdigest()[:16]
    path = cache_dir() / f"decode-{key}.so"
    try:
        if not path.is_file() and _build(cc, path) is None:
            return None
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        log.warning("could not load the CPU decode kernels %s (%s); decoding with numpy / torch instead (slower)", path, e)
        return None
    for name, sizes in (("nexus_mxfp4_bf16", 1), ("nexus_mxfp4_f32", 1), ("nexus_fp8_bf16", 5),
                        ("nexus_fp8_f32", 5)):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * sizes
        fn.restype = None
    _STATE["lib"] = lib
    return lib


def check_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """A decode's `out=` must be a contiguous `dtype` tensor on `device` with as many elements as `shape`."""
    numel = math.prod(shape)
    if out is not None and (out.dtype != dtype or out.device != device or not out.is_contiguous()
                            or out.numel() != numel):
        raise ValueError(f"decode out= must be a contiguous {dtype} tensor of {numel} elements on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")


def decode(kernel: str, inputs: tuple[torch.Tensor, ...], shape: tuple[int, ...], dtype: torch.dtype,
           out: torch.Tensor | None, *sizes: int) -> torch.Tensor | None:
    """Run `kernel` (inputs' pointers, the output's, then `sizes`) into `out` or a new tensor of `shape`;
    None when the kernels are not available (the caller falls back)."""
    lib = library()
    if lib is None:
        return None
    inputs = tuple(t.contiguous() for t in inputs)
    result = torch.empty(shape, dtype=dtype) if out is None else out.view(shape)
    getattr(lib, kernel)(*(t.data_ptr() for t in inputs), result.data_ptr(), *sizes)
    return result
