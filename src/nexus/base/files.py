"""The safetensors files of a model directory: one `model.safetensors`, or shards listed in
`model.safetensors.index.json`.

Every shard's header is read and checked up front (cheap: a few KB per file), so a missing shard or
a truncated or corrupted file is reported, naming the file, before any work starts. Tensor data is
read through memory maps (`safetensors.safe_open`), one slice at a time: reading expert j of a
fused [E, ...] tensor touches only that expert's bytes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import NexusError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
HEADER_LIMIT = 100 * 1024 * 1024  # safetensors refuses headers above 100 MB; so do we

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in the file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header; errors name the file and what is wrong."""
    bad = f"{path}: truncated or corrupted safetensors file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise NexusError(f"{bad} ({size} bytes, shorter than the 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > HEADER_LIMIT or 8 + n > size:
                raise NexusError(f"{bad} (header length {n} does not fit in the file's {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise NexusError(f"{path}: cannot read ({e})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NexusError(f"{bad} (header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise NexusError(f"{bad} (header is not a JSON object)")
    data_start = 8 + n
    infos, spans = {}, []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise NexusError(f"{bad} (malformed header entry for '{name}')") from None
        numel = 1
        for d in shape:
            numel *= d
        if dtype not in DTYPE_BYTES or e - b != numel * DTYPE_BYTES[dtype] or b < 0:
            raise NexusError(f"{bad} ('{name}': dtype {dtype}, shape {list(shape)} do not match its "
                             f"byte range [{b}, {e}))")
        infos[name] = TensorInfo(path, dtype, shape, data_start + b, data_start + e)
        spans.append((b, e))
    spans.sort()
    covered = 0
    for b, e in spans:
        if b != covered:
            raise NexusError(f"{bad} (tensor byte ranges overlap or leave gaps at offset {b})")
        covered = e
    if data_start + covered != size:
        what = "truncated" if data_start + covered > size else "has trailing bytes"
        raise NexusError(f"{bad} (the header describes {data_start + covered} bytes, the file {what}: {size} bytes)")
    return infos


class SafetensorsDir:
    """Tensor name -> `TensorInfo` over a model directory's safetensors files, with slice reads."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_NAME
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
                weight_map = dict(index["weight_map"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
                raise NexusError(f"{index_path}: not a valid safetensors index ({type(e).__name__}: {e})") from None
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_NAME).is_file():
            weight_map, files = None, [SINGLE_NAME]
        else:
            raise NexusError(f"{self.directory}: no {SINGLE_NAME} or {INDEX_NAME} (convert reads safetensors "
                             f"checkpoints only)")
        for name in files:
            if not (self.directory / name).is_file():
                raise NexusError(f"{self.directory / name}: shard listed in {INDEX_NAME} is missing")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            self.tensors.update(read_header(self.directory / name))
        if weight_map is not None:
            for key, name in weight_map.items():
                info = self.tensors.get(key)
                if info is None or info.file.name != Path(name).name:
                    raise NexusError(f"{self.directory / name}: {INDEX_NAME} lists '{key}' in this shard, "
                                     f"but the shard does not hold it")
        self.files = [self.directory / f for f in files]
        self.bytes_read = 0
        self._handles: dict[Path, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def slice_nbytes(self, key: str, index: int | None = None) -> int:
        """Bytes of `key`, or of its slice `[index]` along the first dimension."""
        info = self.tensors[key]
        return info.nbytes if index is None else info.nbytes // info.shape[0]

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """Tensor `key` in its stored dtype, or only its slice `[index]` along the first dimension."""
        info = self.tensors[key]
        handle = self._handles.get(info.file)
        try:
            if handle is None:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
            tensor = handle.get_slice(key)[index] if index is not None else handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise NexusError(f"{info.file}: cannot read '{key}' ({e})") from None
        self.bytes_read += self.slice_nbytes(key, index)
        return tensor

    def read_into(self, key: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read tensor `key` with plain file reads (no memory map) into `out`, or into a new tensor when
        `out` is None; returns it. `out` must be a contiguous CPU tensor of the stored dtype and size.
        `rows` = (start, stop) reads only those rows of the first dimension (a rank's shard).

        Used by the base loader: mapped pages would count toward the process's resident memory until
        the map is closed, which for a multi-GB shard is GBs on top of the model being filled.
        """
        info = self.tensors[key]
        dtype = STORED_DTYPES.get(info.dtype)
        if dtype is None:
            raise NexusError(f"{info.file}: '{key}' is stored as {info.dtype}, which NEXUS does not read")
        shape, begin, nbytes = list(info.shape), info.begin, info.nbytes
        if rows is not None:
            if not shape or not 0 <= rows[0] <= rows[1] <= shape[0]:
                raise ValueError(f"read_into: rows {rows} of '{key}' {shape}")
            row_bytes = info.nbytes // shape[0] if shape[0] else 0
            begin, nbytes, shape[0] = begin + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes, rows[1] - rows[0]
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        if out.dtype != dtype or out.numel() * out.element_size() != nbytes or not out.is_contiguous() \
                or out.device.type != "cpu":
            raise ValueError(f"read_into: '{key}' ({info.dtype} {shape}) does not fit "
                             f"{out.dtype} {list(out.shape)} on {out.device}")
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        try:
            with open(info.file, "rb", buffering=0) as f:
                f.seek(begin)
                done = 0
                while done < nbytes:
                    n = f.readinto(buf[done:])
                    if not n:
                        raise OSError(f"file ends {nbytes - done} bytes early")
                    done += n
        except OSError as e:
            raise NexusError(f"{info.file}: cannot read '{key}' ({e})") from None
        self.bytes_read += nbytes
        return out

    def release(self) -> None:
        """Close the memory maps, so the pages read so far stop counting toward this process's memory."""
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


_TORCH_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                 "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in a declared order, holding none of them.

    The header (names, shapes, dtypes, offsets) is fixed up front from `spec`; `write` then appends
    each tensor's bytes in that order. The file is the standard format (`safetensors.safe_open` and
    `load_file` read it).
    """

    def __init__(self, path: str | os.PathLike, spec: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self._order = []
        for name, shape, dtype in spec:
            nbytes = DTYPE_BYTES[_TORCH_DTYPES[dtype]]
            for d in shape:
                nbytes *= d
            header[name] = {"dtype": _TORCH_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, tuple(shape), dtype))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._next] if self._next < len(self._order) else None
        if expected is None or expected[0] != name or tuple(tensor.shape) != expected[1] or tensor.dtype != expected[2]:
            raise ValueError(f"StreamingWriter: got {name} {tuple(tensor.shape)} {tensor.dtype}, expected {expected}")
        self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)  # 0-dim too
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._order):
            raise ValueError(f"StreamingWriter: {len(self._order) - self._next} declared tensors were never written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self._file.close()
