"""torch.distributed plumbing shared by every stage that runs under `torchrun`.

Outside torchrun (no WORLD_SIZE in the environment) everything degrades to one process: rank 0 of 1,
reductions are no-ops. Under torchrun, gloo is used on CPU and NCCL on GPU, with a finite timeout so a
rank that dies makes the others fail with a clear message instead of hanging forever.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys

import torch
import torch.distributed as tdist

DEFAULT_TIMEOUT_S = int(os.environ.get("NEXUS_DIST_TIMEOUT", "600"))
_joined = False  # this process has been part of a process group


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def init(device: str | torch.device = "cpu", timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun describes; returns True when running distributed."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    global _joined
    _joined = True
    return True


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: str) -> torch.device:
    """`cuda` under torchrun means this rank's GPU."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return d


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (no-op in one process); returns `t`."""
    if is_distributed():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; for small Python objects)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (pickled; for small Python objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """`t` from every rank, in rank order (same shape on every rank); `[t]` in one process."""
    if not is_distributed():
        return [t]
    out = [torch.empty_like(t) for _ in range(world_size())]
    tdist.all_gather(out, t.contiguous())
    return out


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def shutdown() -> None:
    if is_distributed():
        tdist.destroy_process_group()


def joined() -> bool:
    """True once this process has joined a process group (it is a torchrun worker)."""
    return _joined


def exit_process(code: int) -> None:
    """End a torchrun worker whose work is done: flush, run the atexit handlers, then leave at once.

    Under torchrun (the agent serves the rendezvous store), a worker that has written its outputs and
    left its process group can still abort (SIGABRT, "terminate called without an active exception")
    in C++ teardown after the interpreter has finalized, in about 1.5 % of runs on a 2-core machine;
    torchrun then reports the whole job as failed. Everything the job does is finished and flushed
    here, so that last teardown is skipped.
    """
    # atexit has no public way to run its handlers before interpreter exit; tests/test_dist.py pins what
    # this private CPython function does (every handler once, LIFO) on the Python in use.
    atexit._run_exitfuncs()  # logging's own flush is one of them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
