"""Atomic file and directory writes, safe JSON reading, and path comparison.

Outputs appear under their final name only once complete: everything is written to a temporary
sibling first, then renamed (a rename within one filesystem is atomic on POSIX). A write that fails
for want of room (full disk, quota, file size limit, read-only filesystem) becomes a `NexusError`
naming the file; the temporary is removed and whatever had the final name before is untouched.
Temporaries are private while written (mkstemp/mkdtemp make them 0600/0700) and get the modes a
plain `open`/`mkdir` would have given (0666/0777 less the umask) just before the rename, so a group
on a shared machine can read the outputs when the user's umask lets it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import NexusError
from .progress import format_bytes

# Errors only a write can give: converted to a user error that names the file.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust I/O errors carry the errno


def write_error(path: str | os.PathLike, exc: BaseException) -> NexusError | None:
    """`exc` as a user error naming `path` when it is a failed write for want of room, else None."""
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code is None:
        m = _OS_ERROR.search(str(exc))
        code = int(m.group(1)) if m else None
    if code not in WRITE_ERRNOS:
        return None
    where = Path(path).parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"; {format_bytes(shutil.disk_usage(where).free)} free there"
    except OSError:
        free = ""
    return NexusError(f"{path}: cannot write ({os.strerror(code)}{free}); nothing was written under this name "
                      f"and what it held before is unchanged")


def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (a brief window other threads could see)
    os.umask(mask)
    return mask


def publish_mode(path: Path, directory: bool = False) -> None:
    """Give a temporary the mode `open`/`mkdir` would have: 0666 or 0777 less the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."  # the writer's pid: a later run can tell a dead writer's leftover


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete temporaries of `path` whose writer is gone (a kill -9 leaves them; they can be GBs).

    Only `.NAME.PID.XXXX.tmp` siblings of a process no longer running are touched; never the
    output itself, nor a temporary of a writer still at work.
    """
    start = f".{path.name}."
    pattern = re.compile(rf"^{re.escape(start)}(\d+)\.[^.]+\.tmp$")
    removed = []
    with os.scandir(path.parent) as entries:
        for entry in entries:
            m = pattern.match(entry.name) if entry.name.startswith(start) else None
            if m and not _alive(int(m.group(1))):
                p = Path(entry.path)
                shutil.rmtree(p, ignore_errors=True) if entry.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        publish_mode(tmp)
        os.replace(tmp, path)
    except Exception as e:
        err = write_error(path, e)
        if err is None:
            raise
        raise err from e
    finally:
        if tmp.exists():
            tmp.unlink()


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save`, whose failed writes (a RuntimeError from its zip writer) name the file."""
    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as e:
        raise NexusError(f"{path}: cannot write ({str(e).splitlines()[0][:200]}); is the disk full?") from e


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file; a missing or malformed file is a `NexusError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise NexusError(f"{path}: no such {what}")
    if is_safetensors(path):
        raise NexusError(f"{path}: a safetensors file, not JSON; expected a {what}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise NexusError(f"{path}: binary data (byte {e.start} is not UTF-8), not JSON; expected a {what}") from None
    except json.JSONDecodeError as e:
        raise NexusError(f"{path}: not valid JSON ({e}); expected a {what}") from None


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file: equal as written, or both exist and resolve alike."""
    pa, pb = Path(a), Path(b)
    return str(a) == str(b) or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether `path` starts like a safetensors file: an 8-byte little-endian header size, then '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; it replaces `path` when the block succeeds.

    An existing `path` is an error unless `overwrite`; then it is swapped out only after the new
    directory is complete, so a failure at any point leaves the old one in place.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise NexusError(f"{path}: output directory exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        publish_mode(tmp, directory=True)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except Exception as e:
        # A file inside failed (maybe already a NexusError naming the temporary): name the directory.
        cause = e.__cause__ if isinstance(e, NexusError) and e.__cause__ is not None else e
        err = write_error(path, cause)
        if err is None:
            raise
        raise err from cause
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
