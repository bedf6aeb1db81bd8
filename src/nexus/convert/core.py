"""Base model + pca_stats.json -> adapter directory, reading only the selected experts from disk.

    summary = convert("gpt-oss-120b/", "adapter/", "pca_top24", pca_stats="pca_stats.json")

Layer by layer: read each selected expert (memory-mapped, MXFP4 decoded one expert at a time),
fold it into the layer's merge, build the family's one-expert module from the result (scale
applied), check it is finite and computes finite outputs, and append its tensors to the adapter
file. Peak memory is one layer's merge working set, not the model. The adapter goes to a temporary
directory that is renamed into place only after the sanity forward of the converted model passed.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter import WEIGHTS_NAME
from ..config import CONFIG_NAME, FORMAT, VERSION, InitProvenance, LayerInit, NexusConfig
from ..errors import NexusError
from ..fsutil import atomic_dir
from ..moe import check_width, shared_intermediate_size
from ..progress import bar, format_bytes
from ..stats.reservoir import hidden_sample_layers, read_hidden
from ..shared import GATE_NAME, SHARED_NAME, build_shared_expert, init_shared_expert, run_shared_expert
from ..version import __version__
from .checkpoint import ExpertReader
from .merge import from_units, keep_units, make_merger, silence_outputs, strongest_units, to_units, widen
from ..base.files import StreamingWriter
from .strategy import DEFAULT_INIT, LayerSelection, Strategy, load_selection, parse_strategy, ranks_units

CHECK_TOKENS = 8  # tokens in the sanity forward of the converted model
PROBE_TOKENS = 4  # random hidden states each shared expert is run on before it is written
# from_pretrained's peak over the loaded weights' size, for the "does the base fit" estimate; MXFP4
# dequantization measured 1.8× its bf16 output (docs/benchmarks.md, "convert")
LOAD_OVERHEAD = 1.2
SCORE_TOKENS = 1024  # sampled tokens per forward when ranking hidden units by their activations
MXFP4_LOAD_OVERHEAD = 1.8


@dataclass
class LayerPlan:
    layer: int
    experts: list[int]
    weights: list[float]
    read_bytes: int  # expert bytes on disk
    kept_units: list[int] | None = None  # width < 1: hidden units of the merged expert kept (set by build_layer)


@dataclass
class ConvertPlan:
    model_dir: Path
    model_type: str
    strategy: Strategy
    width_multiplier: float
    scale: float
    num_experts: int
    hidden_size: int
    intermediate_size: int  # of one routed expert
    layers: list[LayerPlan]
    checkpoint_bytes: int
    working_bytes: int  # estimated peak of one layer's merge, beyond the Python/torch runtime
    adapter_bytes: int
    base_load_bytes: int  # estimated memory to load the base with from_pretrained (sanity check)
    pca_stats: Path | None = None
    hidden_sample: Path | None = None  # collect's raw sample with hidden states: units ranked by activations
    sample_tokens: dict[int, int] = field(default_factory=dict)  # per layer, tokens in hidden_sample
    gate: float | None = None  # initial value of a learnable scalar on each shared expert's output, if any
    selection: dict[int, LayerSelection] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # things the user should know before the run

    @property
    def shared_intermediate_size(self) -> int:
        return shared_intermediate_size(self.intermediate_size, self.width_multiplier)

    @property
    def read_bytes(self) -> int:
        return sum(lp.read_bytes for lp in self.layers)

    @property
    def ranks_units(self) -> bool:
        """Whether the merged experts hold more hidden units than the shared expert keeps."""
        return ranks_units(self.strategy, self.width_multiplier)

    @property
    def unit_ranking(self) -> str:
        if self.hidden_sample is None:
            return "the strongest by weights, ‖gate row‖·‖up row‖·‖weighted down row‖ (no --hidden-sample)"
        low, high = min(self.sample_tokens.values(), default=0), max(self.sample_tokens.values(), default=0)
        count = f"{low:,}" if low == high else f"{low:,}–{high:,}"
        return (f"the strongest by mean |activation| × ‖weighted down row‖ over {count} sampled tokens per layer "
                f"of {self.hidden_sample}")

    def describe(self, check: bool, available: int | None) -> str:
        s = self.strategy
        lines = [f"convert plan for {self.model_dir} ({self.model_type}: {len(self.layers)} MoE layers, "
                 f"{self.num_experts} experts, hidden {self.hidden_size}, "
                 f"expert intermediate {self.intermediate_size})",
                 f"  init strategy {s.name}" + (f" from {self.pca_stats}" if self.pca_stats else "") +
                 f"; width multiplier {self.width_multiplier} (shared intermediate "
                 f"{self.shared_intermediate_size}); scale {self.scale:g}"]
        if s.reads_experts:
            lines.append("  layer  read        experts:weights (most important first)")
            for lp in self.layers:
                pairs = " ".join(f"{e}:{w:.3f}" for e, w in zip(lp.experts, lp.weights))
                lines.append(f"  {lp.layer:<5d}  {format_bytes(lp.read_bytes):>10s}  {pairs}")
        if self.ranks_units:
            lines.append("  hidden units kept: " + self.unit_ranking)
        lines.append(f"  expert bytes to read: {format_bytes(self.read_bytes)} "
                     f"of {format_bytes(self.checkpoint_bytes)} in the checkpoint")
        lines.append(f"  estimated memory: {format_bytes(self.working_bytes)} working set (largest layer) "
                     f"+ the Python/torch runtime")
        avail = f", {format_bytes(available)} available" if available else ""
        lines.append("  sanity check: " + (f"loads the base (~{format_bytes(self.base_load_bytes)}{avail})" if check
                                             else "skipped (--skip-check): each shared expert is still probed"))
        lines.append(f"  adapter: {format_bytes(self.adapter_bytes)} (fp32)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def resolve_width(strategy: Strategy, width_multiplier: float | None) -> float:
    if width_multiplier is not None:
        width_multiplier = check_width(width_multiplier)  # 3.0 from the command line reads as 3
    if strategy.kind == "concat":
        if width_multiplier not in (None, strategy.top_k):
            raise NexusError(f"--width-multiplier {width_multiplier}: {strategy.name} builds a {strategy.top_k}×-wide "
                             f"shared expert; leave --width-multiplier out or pass {strategy.top_k}")
        return strategy.top_k
    return check_width(1 if width_multiplier is None else width_multiplier)


def _base_load_bytes(reader: ExpertReader, dequantize: bool = False) -> int:
    """Memory to load the base for the sanity check: packed experts stay packed unless `dequantize`."""
    plain = packed = dequantized = 0
    for key, info in reader.files.tensors.items():
        if key.endswith("_blocks"):
            packed += info.nbytes
            dequantized += info.nbytes * 2 * 2  # two values per byte, loaded as bf16
        elif info.dtype == "F8_E4M3":
            if ".experts." in key:
                packed += info.nbytes
            else:
                plain += info.nbytes * 2  # non-expert FP8 linears load dequantized to bf16 either way
            dequantized += info.nbytes * 2
        elif key.endswith(("_scales", "_scale_inv")):
            packed += info.nbytes
        else:
            plain += info.nbytes
    if dequantize or (packed == 0 and dequantized == 0):
        return int(plain * LOAD_OVERHEAD + dequantized * MXFP4_LOAD_OVERHEAD)
    return int((plain + packed) * LOAD_OVERHEAD)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no /proc)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def make_plan(reader: ExpertReader, strategy: Strategy, width: int, scale: float,
              pca_stats: str | os.PathLike | None, dequantize: bool = False,
              hidden_sample: str | os.PathLike | None = None) -> ConvertPlan:
    """What convert will do: per-layer experts and weights, bytes to read, memory and output size."""
    blocks = [reader.blocks[layer] for layer in reader.layers]
    layout = blocks[0].layout
    selection, notes = {}, []
    if strategy.reads_experts:
        selection, stats = load_selection(pca_stats, strategy, reader.layers, reader.num_experts)
        ranked_by = (stats.get("selection") or {}).get("importance")
        if strategy.kind in ("pca", "frequency") and ranked_by not in (None, strategy.kind):
            notes.append(f"{pca_stats} ranked experts by '{ranked_by}', the strategy is named {strategy.name}; "
                         f"the merge uses the file's selection either way")
    sample_tokens, sample_width = {}, 0
    if hidden_sample is not None:
        if not ranks_units(strategy, width):
            raise NexusError(f"--hidden-sample ranks the merged experts' hidden units that convert keeps (feature_topK "
                             f"/ pruned_topK below width K, an averaging merge below width 1); {strategy.name} at "
                             f"width {width:g} keeps all of them")
        sample_tokens, sample_width = hidden_sample_layers(hidden_sample)
        missing = [i for i in reader.layers if not sample_tokens.get(i)]
        if missing:
            raise NexusError(f"--hidden-sample {hidden_sample}: no hidden states for MoE layers {missing}")
        if sample_width != layout.hidden_size:
            raise NexusError(f"--hidden-sample {hidden_sample}: hidden states of width {sample_width}, the experts of "
                             f"{reader.model_dir} read {layout.hidden_size} (another model's sample?)")
    layers, working = [], 0
    for b in blocks:
        expert = b.layout.expert_numel() * 4  # one expert in fp32
        shared = b.layout.expert_numel(shared_intermediate_size(b.layout.intermediate_size, width)) * 4
        sel = selection.get(b.layer, LayerSelection([], []))
        raw = reader.expert_nbytes(b.layer)
        if strategy.kind in ("pca", "frequency"):
            work = 4 * expert + raw  # accumulator, expert read, decode scratch, the merged layout copy
        elif strategy.kind == "aligned":
            i = b.layout.intermediate_size
            work = 8 * expert + 2 * i * i * 8 + raw  # + anchor, float64 unit features, similarity matrix
        elif strategy.kind in ("concat", "feature", "pruned"):
            work = (strategy.top_k + 2) * expert + raw
        else:
            work = 0
        if sample_tokens:  # the layer's sample (<= fp32), the scoring module (<= H units), one chunk of tokens
            h, merged = b.layout.hidden_size, strategy.merged_width * b.layout.intermediate_size
            work += sample_tokens[b.layer] * h * 4 + 3 * h * min(h, merged) * 4 + 3 * SCORE_TOKENS * h * 4
        working = max(working, work + 2 * shared)  # the built module and the tensors copied into it
        layers.append(LayerPlan(b.layer, sel.experts, sel.weights, raw * len(sel.experts)))
    return ConvertPlan(
        model_dir=reader.model_dir, model_type=reader.config.model_type, strategy=strategy, width_multiplier=width,
        scale=scale, num_experts=reader.num_experts, hidden_size=layout.hidden_size,
        intermediate_size=layout.intermediate_size, layers=layers,
        checkpoint_bytes=sum(i.nbytes for i in reader.files.tensors.values()), working_bytes=working,
        adapter_bytes=sum(b.layout.expert_numel(shared_intermediate_size(b.layout.intermediate_size, width)) * 4
                          for b in blocks),
        base_load_bytes=_base_load_bytes(reader, dequantize), pca_stats=Path(pca_stats).resolve() if pca_stats else None,
        hidden_sample=Path(hidden_sample).resolve() if hidden_sample else None, sample_tokens=sample_tokens,
        selection=selection, notes=notes)


def mean_abs_activations(block, model: torch.nn.Module, units: dict[str, torch.Tensor], layout,
                         hidden: torch.Tensor) -> torch.Tensor:
    """Mean |activation| of every hidden unit of `units` over the tokens `hidden` (n, H): (I,) fp32.

    The family's own experts forward computes them (its activation, clamps, biases): a one-expert module
    holding up to H of the units, whose down projection copies unit j's activation to output j (no down
    bias), run on the tokens in chunks of SCORE_TOKENS.
    """
    inter, width = units["down"].shape
    total = torch.zeros(inter, dtype=torch.float64)
    for start in range(0, inter, width):
        rows = list(range(start, min(start + width, inter)))
        part = keep_units(units, rows)
        part["down"] = torch.eye(len(rows), width)  # (c, H): activation j -> output j
        if "down_bias" in part:
            part["down_bias"] = torch.zeros(width)
        module = build_shared_expert(block, model, intermediate_size=len(rows), device="cpu")
        with torch.no_grad():
            for name, tensor in from_units(part, layout).items():
                getattr(module, name).copy_(tensor)
            for x in hidden.split(SCORE_TOKENS):
                out = run_shared_expert(module, x.float())  # (t, H)
                total[start:start + len(rows)] += out[:, :len(rows)].abs().sum(0, dtype=torch.float64)
    return (total / max(hidden.shape[0], 1)).float()


def build_layer(reader: ExpertReader, plan: ConvertPlan, lp: LayerPlan, generator: torch.Generator,
                probe: torch.Generator) -> dict[str, torch.Tensor]:
    """The shared expert of one layer: {param name: [1, ...] fp32 tensor}, checked finite."""
    block = reader.blocks[lp.layer]
    layout, strategy = block.layout, plan.strategy
    std = float(getattr(reader.config, "initializer_range", 0.02))
    tensors = None
    if strategy.reads_experts:
        merger = make_merger(strategy.kind, strategy.top_k)
        for expert, weight in zip(lp.experts, lp.weights):
            merger.add(to_units(reader.read_expert(lp.layer, expert), layout), weight)
        units = merger.result()
        if strategy.kind != "concat":
            target = shared_intermediate_size(layout.intermediate_size, plan.width_multiplier)
            if target < units["down"].shape[0]:
                activations = None
                if plan.hidden_sample is not None:
                    activations = mean_abs_activations(block, reader.model, units, layout,
                                                       read_hidden(plan.hidden_sample, lp.layer))
                lp.kept_units = strongest_units(units, target, activations)
                units = keep_units(units, lp.kept_units)
            units = widen(units, target, std, generator)
        if strategy.kind == "feature":
            units = silence_outputs(units)  # the strongest units were chosen on their weighted down rows
        tensors = from_units(units, layout)
        del merger, units
        reader.release()
    shared = build_shared_expert(block, reader.model, plan.width_multiplier)
    init_shared_expert(shared, strategy.kind, std, tensors, plan.scale, generator)
    if plan.gate is not None:  # output × gate, learnable; a small value lets an init start near the base
        setattr(shared, GATE_NAME, torch.nn.Parameter(torch.tensor(float(plan.gate))))
    where = f"layer {lp.layer} ({strategy.name})"
    for name, p in shared.named_parameters():
        if not torch.isfinite(p).all():
            raise NexusError(f"{where}: the shared expert's {name} has NaN/Inf values (non-finite expert weights in "
                             f"{reader.model_dir}?); nothing written")
    with torch.no_grad():
        out = run_shared_expert(shared, torch.randn(PROBE_TOKENS, layout.hidden_size, generator=probe))
    if not torch.isfinite(out).all():
        raise NexusError(f"{where}: the shared expert computes NaN/Inf on random inputs; nothing written")
    return {name: p.detach() for name, p in shared.named_parameters()}


def sanity_forward(adapter_dir: Path, dequantize: bool = False) -> float:
    """Load the adapter the normal way (nexus.load_model) and run a few tokens; NaN/Inf is an error.

    Returns the largest |logit change| the shared experts cause on those tokens.
    """
    from ..adapter import load_model
    from ..shared import shared_experts_disabled

    model = load_model(adapter_dir, dtype="auto", dequantize=dequantize).eval()
    ids = torch.randint(model.config.vocab_size, (1, CHECK_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        with shared_experts_disabled(model):
            base = model(input_ids=ids).logits.float()
    if not torch.isfinite(logits).all():
        raise NexusError(f"sanity check failed: the converted model gives NaN/Inf logits on {CHECK_TOKENS} tokens; "
                         f"nothing written")
    return float((logits - base).abs().max())


def convert(input_dir: str, output_dir: str, init_strategy: str = DEFAULT_INIT,
            pca_stats: str | None = None, width_multiplier: float | None = None, scale: float = 1.0,
            seed: int = 0, check: bool = True, overwrite: bool = False, dry_run: bool = False, log=print,
            dequantize: bool = False, gate: float | None = None, hidden_sample: str | None = None) -> dict:
    """Convert `input_dir` (a transformers model directory) into an adapter at `output_dir`.

    Returns a summary (layers, experts_read, bytes_read, seconds, adapter_bytes, ...); with
    `dry_run` only the plan, and nothing is written.
    """
    start = time.perf_counter()
    strategy = parse_strategy(init_strategy)
    if strategy.reads_experts and not pca_stats:
        raise NexusError(f"--init-strategy {strategy.name} merges the experts pca_stats.json selects: pass --pca-stats")
    if not math.isfinite(scale):
        raise NexusError(f"--scale must be a finite number, got {scale}")
    if gate is not None and not math.isfinite(gate):
        raise NexusError(f"--gate must be a finite number, got {gate}")
    width = resolve_width(strategy, width_multiplier)
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite and not dry_run:
        raise NexusError(f"--output {output_dir}: output directory exists (pass --overwrite to replace it)")
    input_path = Path(input_dir)
    if not input_path.is_dir():
        raise NexusError(f"--input {input_dir}: no such model directory")
    reader = ExpertReader(input_path)
    plan = make_plan(reader, strategy, width, scale, pca_stats, dequantize=dequantize, hidden_sample=hidden_sample)
    plan.gate = gate
    available = available_memory()
    if not dry_run:
        for note in plan.notes:
            log(f"note: {note}")
        if plan.ranks_units:
            log("hidden units kept: " + plan.unit_ranking)
    if dry_run:
        log(plan.describe(check, available))
        if output_dir.exists() and not overwrite:
            log(f"  output: {output_dir} exists; a real run needs --overwrite")
        return {"dry_run": True, "plan": plan}
    if check and available is not None and plan.base_load_bytes > available:
        raise NexusError(f"the sanity check loads the base model (~{format_bytes(plan.base_load_bytes)}), more than "
                         f"the {format_bytes(available)} available: pass --skip-check to convert without it")
    blocks = [reader.blocks[lp.layer] for lp in plan.layers]
    gated = [GATE_NAME] if gate is not None else []
    spec = []  # in the order the layers are written: each layer's projections, then its gate
    for b in blocks:
        shapes = b.layout.param_shapes(1, shared_intermediate_size(b.layout.intermediate_size, width))
        spec += [(f"{b.path}.{SHARED_NAME}.{name}", shape, torch.float32) for name, shape in shapes.items()]
        spec += [(f"{b.path}.{SHARED_NAME}.{name}", (), torch.float32) for name in gated]
    generator = torch.Generator().manual_seed(seed)
    probe = torch.Generator().manual_seed(seed + 1)
    delta, layer_seconds = None, 0.0
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        with StreamingWriter(tmp / WEIGHTS_NAME, spec, metadata={"format": FORMAT, "version": str(VERSION)}) as w:
            with bar(len(blocks), "convert", unit="layer", unit_scale=False) as progress:
                for b, lp in zip(blocks, plan.layers):
                    t0 = time.perf_counter()
                    tensors = build_layer(reader, plan, lp, generator, probe)
                    for name in [*b.layout.param_shapes(1, 1), *gated]:
                        w.write(f"{b.path}.{SHARED_NAME}.{name}", tensors[name])
                    del tensors
                    layer_seconds += time.perf_counter() - t0
                    progress.set_postfix_str(f"layer {lp.layer}, {format_bytes(reader.bytes_read)} read, "
                                             f"peak RSS {format_bytes(peak_rss_bytes())}", refresh=False)
                    progress.update()
        adapter_config(plan, reader, seed).to_json_file(tmp / CONFIG_NAME)
        if check:
            delta = sanity_forward(tmp, dequantize=dequantize)
            log(f"sanity check: {CHECK_TOKENS} tokens through the converted model, all logits finite "
                f"(max |change| from the shared experts {delta:.4g})")
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in output_dir.iterdir())
    summary = {"layers": len(blocks), "experts_read": reader.experts_read, "bytes_read": reader.bytes_read,
               "seconds": seconds, "layer_seconds": layer_seconds, "adapter_bytes": size, "output": str(output_dir),
               "strategy": strategy.name, "peak_rss_bytes": peak_rss_bytes(), "check_max_logit_change": delta}
    rate = reader.bytes_read / max(layer_seconds, 1e-9)
    log(f"converted {len(blocks)} MoE layers ({strategy.name}): {reader.experts_read} experts, "
        f"{format_bytes(reader.bytes_read)} read ({format_bytes(rate)}/s over {layer_seconds:.1f} s of layer work), "
        f"{seconds:.1f} s in all; adapter {format_bytes(size)} written to {output_dir}")
    return summary


def adapter_config(plan: ConvertPlan, reader: ExpertReader, seed: int) -> NexusConfig:
    """The adapter's config as `nexus.save_adapter` writes it, plus the init's provenance."""
    s = plan.strategy
    layers = tuple(LayerInit(lp.layer, lp.experts, lp.weights, lp.kept_units) for lp in plan.layers) \
        if s.reads_experts else ()
    init = InitProvenance(seed=seed, pca_stats=str(plan.pca_stats) if s.reads_experts else None, layers=layers,
                          hidden_sample=str(plan.hidden_sample) if plan.hidden_sample else None)
    return NexusConfig(base_model_name_or_path=str(reader.model_dir.resolve()), model_type=reader.config.model_type,
                       moe_layers=tuple(lp.layer for lp in plan.layers), num_experts=plan.num_experts,
                       intermediate_size=plan.shared_intermediate_size, width_multiplier=plan.width_multiplier,
                       init_strategy=s.name, scale=float(plan.scale), gate=plan.gate is not None,
                       nexus_version=__version__, init=init)
