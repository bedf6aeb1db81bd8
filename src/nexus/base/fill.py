"""What fills each parameter of a model built on the meta device from a checkpoint's tensors.

    plan = FillPlan(model, SafetensorsDir(path), codec, where)   # made by nexus.base.loader.build_on_meta
    plan.add_packed(...); plan.add_unquantized_experts(...); plan.add_rest(sources)
    plan.load(device)            # one process: every parameter allocated whole, then filled
    plan.load_sharded()          # a sharded (FSDP2) model: each rank fills only the rows it holds

Reads go shard file by shard file in file order, with plain file reads straight into the
destination where no conversion is needed (no memory maps: mapped pages would count toward the
process's memory). Non-expert FP8 linears are dequantized to the model's dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import NexusError
from .files import STORED_DTYPES, SafetensorsDir
from .quantized import Codec
from .sources import SCALE_SUFFIX, FusedSource, Mxfp4Source, PerExpertSource

log = logging.getLogger("nexus.base")


def is_quantized_source(src) -> bool:
    return isinstance(src, Mxfp4Source) or (isinstance(src, FusedSource) and src.scale is not None) or \
        (isinstance(src, PerExpertSource) and src.scales is not None)


class FillPlan:
    """What fills each parameter: a list of (file key, setter) reads, grouped by file when loaded."""

    def __init__(self, model: nn.Module, files: SafetensorsDir, codec: Codec | None, where: str):
        self.model, self.files, self.codec, self.where = model, files, codec, where
        self.reads: list[tuple[str, str, object]] = []  # (checkpoint key, parameter name, how)
        self.consumed: set[str] = set()
        self.targets: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def _param(self, name: str) -> nn.Parameter:
        return self.model.get_parameter(name)

    def _read(self, key: str, name: str, how) -> None:
        self.reads.append((key, name, how))
        self.consumed.add(key)

    def add_packed(self, prefix: str, proj: str, src, out_in: tuple[int, int]) -> None:
        """The packed tensors of one quantized projection."""
        if isinstance(src, Mxfp4Source):
            self._read(src.blocks, prefix + proj + "_blocks", ("copy",))
            self._read(src.scales, prefix + proj + "_scales", ("copy",))
        elif isinstance(src, FusedSource):  # FP8 fused [E, out, in] + [E, ⌈out/bo⌉, ⌈in/bi⌉]
            self._read(src.key, prefix + proj, ("copy",))
            self._read(src.scale, prefix + proj + SCALE_SUFFIX, ("copy",))
        else:  # FP8 per expert: expert j's parts concatenated along the output rows
            if len(src.parts) > 1 and src.concat_dim != 0:
                raise NexusError(f"{self.where}: per-expert FP8 pieces of {prefix + proj} are joined along their "
                                 f"input dimension; not supported")
            bo, _ = self.codec.block
            rows = out_in[0] // len(src.parts)
            if len(src.parts) > 1 and rows % bo:
                raise NexusError(f"{self.where}: {prefix + proj} joins {len(src.parts)} FP8 pieces of {rows} rows, not "
                                 f"a multiple of the {bo}-row scale block; their scale grids cannot be joined")
            for p, (part, scales) in enumerate(zip(src.parts, src.scales)):
                for j, key in part.items():
                    self._read(key, prefix + proj, ("rows", j, p * rows, rows))
                    self._read(scales[j], prefix + proj + SCALE_SUFFIX, ("rows", j, p * (rows // bo), rows // bo))

    def add_unquantized_experts(self, prefix: str, params: list[str], sources: dict) -> None:
        for n in params:
            src = sources.get(prefix + n)
            if isinstance(src, FusedSource):
                self._read(src.key, prefix + n, ("copy",))
            elif isinstance(src, PerExpertSource) and src.scales is None:
                shape = self._param(prefix + n).shape  # [E, a, b]; parts joined along concat_dim of [a, b]
                size = shape[1 + src.concat_dim] // len(src.parts)
                for p, part in enumerate(src.parts):
                    for j, key in part.items():
                        self._read(key, prefix + n, ("piece", j, src.concat_dim, p * size, size))
            else:
                raise NexusError(f"{self.where}: no checkpoint tensors for '{prefix + n}'")

    def add_rest(self, sources: dict) -> None:
        """Every other checkpoint tensor, renamed as transformers renames it; FP8 linears dequantized."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(self.model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        params = dict(self.model.named_parameters())
        buffers = {n for n, _ in self.model.named_buffers() if n.rpartition(".")[2] not in
                   self.model.get_submodule(n.rpartition(".")[0])._non_persistent_buffers_set}
        keys = set(self.files.keys())
        unexpected = []
        for key in self.files.keys():
            if key in self.consumed or (key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in keys):
                continue
            target, _ = rename_source_key(key, renamings, converters, self.model.base_model_prefix, params)
            if target not in params and key in params:
                target = key
            if target in buffers or (target not in params and key in buffers):
                # a persistent buffer the checkpoint stores (DeepSeek-V3's e_score_correction_bias steers routing)
                self._read(key, target if target in buffers else key, ("buffer",))
                continue
            if target not in params:
                unexpected.append(key)
                continue
            scale = key + SCALE_SUFFIX
            if scale in keys:
                if self.codec is None or self.codec.name != "fp8":
                    raise NexusError(f"{self.where}: '{key}' has an FP8 scale in a checkpoint whose config declares "
                                     f"{self.codec.name if self.codec else 'no'} quantization")
                self._read(key, target, ("fp8", scale))
            else:
                self._read(key, target, ("copy",))
        if unexpected:  # transformers skips these too (e.g. DeepSeek-V3's multi-token-prediction layer)
            log.info("%s: %d checkpoint tensors the model does not use (e.g. %s)", self.where, len(unexpected),
                     unexpected[0])

    def load(self, device: torch.device) -> None:
        """Allocate every planned parameter on `device`, then stream the shards one file at a time."""
        filled: dict[str, torch.Tensor] = {}
        for _, name, how in self.reads:
            if how[0] == "buffer":
                filled[name] = self.model.get_buffer(name)  # real already (built outside the meta device)
            elif name not in filled:
                meta = self._param(name)
                filled[name] = torch.empty(meta.shape, dtype=meta.dtype, device=device)
        by_file: dict[Path, list] = {}
        for key, name, how in self.reads:
            by_file.setdefault(self.files.tensors[key].file, []).append((key, name, how))
        for file in sorted(by_file):
            for key, name, how in sorted(by_file[file], key=lambda r: self.files.tensors[r[0]].begin):
                self._fill(filled[name], key, name, how)
        buffers = {name for _, name, how in self.reads if how[0] == "buffer"}
        for name, tensor in filled.items():
            if name in buffers:
                continue
            module_name, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)

    def load_sharded(self) -> set[str]:
        """Fill this rank's rows of every planned parameter of the sharded model (and the planned buffers,
        whole); returns the names filled. Shards are read one file at a time, in file order."""
        from ..sharding import local_rows

        by_file: dict[Path, list] = {}
        for key, name, how in self.reads:
            by_file.setdefault(self.files.tensors[key].file, []).append((key, name, how))
        for file in sorted(by_file):
            for key, name, how in sorted(by_file[file], key=lambda r: self.files.tensors[r[0]].begin):
                if how[0] == "buffer":
                    self._fill(self.model.get_buffer(name), key, name, how)
                    continue
                local, start, stop = local_rows(self._param(name))
                if how[0] in ("rows", "piece"):  # expert j's part: only on the rank that holds row j
                    j = how[1]
                    if start <= j < stop:
                        self._fill(local, key, name, (how[0], j - start, *how[2:]))
                elif start < stop:
                    self._fill(local, key, name, how, rows=(start, stop))
        return {name for _, name, how in self.reads if how[0] != "buffer"}

    def _fill(self, dest: torch.Tensor, key: str, name: str, how, rows: tuple[int, int] | None = None) -> None:
        """Read checkpoint tensor `key` into its place in `dest` (file reads, no memory maps)."""
        kind = how[0]
        info = self.files.tensors[key]
        shape = tuple(info.shape) if rows is None else (rows[1] - rows[0], *info.shape[1:])
        read_rows = rows if kind == "copy" else None  # an FP8 linear decodes whole, then gives its rows
        if kind in ("copy", "rows") and dest.device.type == "cpu":  # straight into place when nothing converts
            view = dest if kind == "copy" else dest[how[1], how[2]:how[2] + how[3]]
            if STORED_DTYPES.get(info.dtype) == dest.dtype and view.is_contiguous() and tuple(view.shape) == shape:
                self.files.read_into(key, view, read_rows)
                return
        t = self.files.read_into(key, None, read_rows)
        if kind == "buffer":
            if tuple(t.shape) != tuple(dest.shape):
                raise NexusError(f"{info.file}: '{key}' is {list(t.shape)}; the model's '{name}' is {list(dest.shape)}")
            dest.copy_(t)
            return
        if kind == "fp8":
            from . import fp8

            scale = self.files.read_into(how[1], None)
            t = fp8.decode(t.to(dest.device), scale.to(dest.device), self.codec.block, dest.dtype)
            if rows is not None:
                t = t[rows[0]:rows[1]]
            kind = "copy"
        if kind == "copy":
            view = dest
        elif kind == "rows":  # expert j, rows [start, start + n) of a packed [E, rows, cols] tensor
            _, j, start, n = how
            view = dest[j, start:start + n]
        else:  # "piece": expert j, a slice of its [a, b] along dim d
            _, j, d, start, n = how
            view = dest[j].narrow(d, start, n)
        if tuple(t.shape) != tuple(view.shape) or (not dest.is_floating_point() and t.dtype != dest.dtype) or \
                (dest.dtype.is_floating_point and dest.dtype.itemsize == 1 and t.dtype != dest.dtype):
            raise NexusError(f"{self.files.tensors[key].file}: '{key}' is {t.dtype} {list(t.shape)}; the model's "
                             f"'{name}' needs {dest.dtype} {list(view.shape)} there")
        view.copy_(t)
