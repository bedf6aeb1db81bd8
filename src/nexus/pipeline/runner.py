"""The pipeline run: stages wired output to input, checked before anything runs, finished ones skipped.

`load_pipeline_config` reads the YAML file `nexus pipeline` takes (see `nexus.pipeline.cli` for its
keys), `Context` resolves its paths, `check_config` runs every stage's own flag checks up front and
`run_pipeline` runs the stages through their verbs (`nexus.verbs`), each with its own parser.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NexusError
from ..verbs import verb_module

STAGES = ("sample", "collect", "analyze", "convert", "precompute-teacher", "train", "validate")
OPTIONAL_STAGES = ("precompute-teacher",)
TOP_KEYS = ("model", "dataset", "work_dir", "stages")


@dataclass
class Stage:
    name: str  # the verb that runs it (nexus.verbs)
    output_flag: str
    output_name: str
    # flag -> callable(ctx) giving the default input wiring
    inputs: dict = field(default_factory=dict)
    done: str = ""  # path relative to the output that marks completion ("" = the output itself)
    resume: tuple = ()  # extra args that continue an unfinished run
    resume_if_exists: bool = True  # pass `resume` only when the output already exists (partial)
    needs: dict = field(default_factory=dict)  # flag -> the stage whose output it is wired to
    needed_if: dict = field(default_factory=dict)  # flag -> callable(ctx): that input is needed at all


def _merges(ctx) -> bool:
    """Whether the config's convert init reads experts (and so needs analyze's pca_stats.json)."""
    from ..convert.strategy import DEFAULT_INIT, parse_strategy

    return parse_strategy(str(ctx.stage_opt("convert", "init_strategy", DEFAULT_INIT))).reads_experts


def _hidden_sample(ctx) -> str | None:
    """collect's raw sample, where collect keeps hidden states (keep_hidden) and convert keeps only some of the
    merged experts' hidden units (`convert.strategy.ranks_units`): convert then ranks them by their activations."""
    from ..convert.strategy import DEFAULT_INIT, parse_strategy, ranks_units
    from ..stats.reservoir import raw_path

    if not (ctx.enabled("collect") and ctx.stage_opt("collect", "keep_hidden", False)):
        return None
    strategy = parse_strategy(str(ctx.stage_opt("convert", "init_strategy", DEFAULT_INIT)))
    width = float(ctx.stage_opt("convert", "width_multiplier", None) or 1)
    return str(raw_path(ctx.out("collect"))) if ranks_units(strategy, width) else None


def _trained_adapter(ctx) -> str:
    """What validate reads: train's best/ when train keeps one (--general-eval-dataset), else its final/."""
    return str(Path(ctx.out("train")) / ("best" if ctx.stage_opt("train", "general_eval_dataset") else "final"))


def _stage_table():
    return {
        "sample": Stage("sample", "--output", "sample.jsonl",
                        {"--dataset": lambda c: c.dataset, "--tokenizer": lambda c: c.model}),
        "collect": Stage("collect", "--output", "router_stats.safetensors",
                         {"--model": lambda c: c.model, "--dataset": lambda c: c.out("sample")},
                         resume=("--resume",), resume_if_exists=False,  # its partial state sits beside the output
                         needs={"--dataset": "sample"}),
        "analyze": Stage("analyze", "--output", "pca_stats.json",
                         {"--input": lambda c: c.out("collect")}, needs={"--input": "collect"}),
        "convert": Stage("convert", "--output", "adapter",
                         {"--input": lambda c: c.model,
                          "--pca-stats": lambda c: c.out("analyze") if c.enabled("analyze") or _merges(c) else None,
                          "--hidden-sample": _hidden_sample},
                         needs={"--pca-stats": "analyze", "--hidden-sample": "collect"},
                         needed_if={"--pca-stats": _merges, "--hidden-sample": lambda c: _hidden_sample(c) is not None}),
        "precompute-teacher": Stage("precompute-teacher", "--output", "teacher_cache",
                                    {"--model": lambda c: c.model,
                                     "--dataset": lambda c: c.path(c.stage_opt("train", "dataset", c.dataset))},
                                    done="manifest.json"),  # continues from its complete shards by itself
        "train": Stage("train", "--output-dir", "train",
                       {"--student-model": lambda c: c.out("convert"), "--dataset": lambda c: c.dataset,
                        "--precomputed-teacher": lambda c: c.out("precompute-teacher") if c.enabled(
                            "precompute-teacher") else None},
                       done="final", resume=("--resume-from-checkpoint", "latest"),
                       needs={"--student-model": "convert"}),
        "validate": Stage("validate", "--output", "validation",
                          {"--model": _trained_adapter}, done="report.json",
                          needs={"--model": "train"}),
    }


class Context:
    """Paths of one config. With `write_data=False`, `nexus-demo:data/SPLIT` names its file without
    writing it (for the checks made before anything is written)."""

    def __init__(self, cfg: dict, base_dir: Path, write_data: bool = True):
        self.cfg = cfg
        self.base_dir = base_dir
        self.write_data = write_data
        self.work_dir = self._abs(cfg.get("work_dir", "nexus_out"))
        self.model = self.path(cfg["model"])
        self.dataset = self.path(cfg["dataset"]) if cfg.get("dataset") else None
        self.table = _stage_table()

    def _abs(self, value) -> str:
        p = Path(str(value)).expanduser()
        return str(p if p.is_absolute() else (self.base_dir / p))

    def path(self, value) -> str:
        return self._abs(resolve_builtin(str(value), self.work_dir, self.write_data))

    def stage_opt(self, stage: str, key: str, default=None):
        return (self.cfg["stages"].get(stage) or {}).get(key, default)

    def enabled(self, stage: str) -> bool:
        return stage in self.cfg["stages"] and self.cfg["stages"][stage] is not False

    def out(self, stage: str) -> str:
        given = self.stage_opt(stage, self.table[stage].output_flag.lstrip("-").replace("-", "_"))
        return self.path(given) if given else str(Path(self.work_dir) / self.table[stage].output_name)


_BUILTIN = re.compile(r"nexus-demo:(model|data/(\w+))")


def resolve_builtin(value: str, work_dir: str | None, write: bool = True) -> str:
    """Replace `nexus-demo:model` by the bundled demo model's directory and `nexus-demo:data/SPLIT`
    by a JSONL file of that split of the demo corpus (written once under `work_dir/data/`, unless
    not `write`)."""
    def sub(m: re.Match) -> str:
        from .. import demo_data

        if m.group(1) == "model":
            return str(demo_data.DEMO_MODEL_DIR)
        split = m.group(2)
        if split not in demo_data.SPLITS:
            raise NexusError(f"{m.group(0)}: unknown demo split (expected one of {', '.join(demo_data.SPLITS)})")
        if work_dir is None:
            raise NexusError(f"{m.group(0)}: demo data needs a work_dir")
        path = Path(work_dir) / "data" / f"{split}.jsonl"
        if write and not path.is_file():
            demo_data.write_split(split, path)
        return str(path)

    return _BUILTIN.sub(sub, value)


def load_pipeline_config(path: str | Path) -> dict:
    """Read and check a pipeline YAML file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise NexusError(f"{path}: no such pipeline config")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise NexusError(f"{path}: not valid YAML ({where}{getattr(e, 'problem', None) or e})") from None
    if not isinstance(cfg, dict):
        raise NexusError(f"{path}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(cfg) - set(TOP_KEYS))
    if unknown:
        raise NexusError(f"{path}: unknown keys {unknown} (expected {', '.join(TOP_KEYS)})")
    if "model" not in cfg:
        raise NexusError(f"{path}: 'model' is required")
    stages = cfg.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise NexusError(f"{path}: 'stages' must map stage names ({', '.join(STAGES)}) to their options")
    for name, opts in stages.items():
        if name not in STAGES:
            raise NexusError(f"{path}: unknown stage '{name}' (expected one of {', '.join(STAGES)})")
        if opts is not None and opts is not False and not isinstance(opts, dict):
            raise NexusError(f"{path}: options of stage '{name}' must be a mapping")
    return cfg


def options_argv(options: dict, work_dir: str, write: bool = True) -> list[str]:
    """`{"target_tokens": 10, "pack": True}` -> `["--target-tokens", "10", "--pack"]`."""
    argv = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
        elif isinstance(value, list):
            for v in value:
                argv += [flag, resolve_builtin(str(v), work_dir, write)]
        elif value is not None:
            argv += [flag, resolve_builtin(str(value), work_dir, write)]
    return argv


def stage_argv(ctx: Context, name: str) -> list[str]:
    """The full command line of one stage, as `nexus NAME ...` would take it."""
    stage = ctx.table[name]
    opts = dict(ctx.cfg["stages"].get(name) or {})
    given = {"--" + k.replace("_", "-") for k in opts}
    argv = []
    for flag, fn in stage.inputs.items():
        if flag in given:
            continue
        value = fn(ctx)
        if value is not None:
            argv += [flag, str(value)]
    out_key = stage.output_flag.lstrip("-").replace("-", "_")
    opts.pop(out_key, None)
    argv += [stage.output_flag, ctx.out(name)]
    return argv + options_argv(opts, ctx.work_dir, ctx.write_data)


class _StageParser(argparse.ArgumentParser):
    """A verb's parser whose errors are one-line `NexusError`s (no usage dump, no exit)."""

    def error(self, message):
        raise NexusError(message)


def _stage_parser(name: str) -> argparse.ArgumentParser:
    mod = verb_module(name)
    parser = _StageParser(prog=f"nexus {name}", exit_on_error=False, allow_abbrev=False, add_help=False)
    parser.add_argument("--debug", action="store_true")
    mod.add_arguments(parser)
    return parser


def build_stage_args(name: str, argv: list[str], source: str = "pipeline config") -> argparse.Namespace:
    """Parse a stage's argv with that verb's own parser (so the same flags and checks apply)."""
    try:
        args = _stage_parser(name).parse_args(argv)
    except (argparse.ArgumentError, NexusError) as e:
        raise NexusError(f"{source}: stage '{name}': {e}") from None
    args.argv, args.verb = [name, *argv], name  # for the commands printed by refusals and Ctrl-C
    return args


def known_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}  # argparse has no public list


def check_config(ctx: Context, names: list[str], source: str = "pipeline config", check_paths: bool = True) -> None:
    """Everything that can be checked before a stage runs: option names, their values (each verb's own
    parser and flag checks), that every stage's wired inputs will exist, and (`check_paths`) that the
    model and dataset do. Writes nothing."""
    import difflib

    for key in ("model", "dataset"):  # a local path (nexus reads no network), or the bundled demo's
        value = ctx.cfg.get(key)
        if check_paths and value and not _BUILTIN.search(str(value)) and not Path(getattr(ctx, key)).exists():
            raise NexusError(f"{source}: {key} {getattr(ctx, key)}: no such file or directory")
    for name in names:
        stage = ctx.table[name]
        known = known_flags(_stage_parser(name))
        for key in ctx.cfg["stages"].get(name) or {}:
            flag = "--" + str(key).replace("_", "-")
            if flag not in known:
                close = difflib.get_close_matches(flag, sorted(known), n=1)
                hint = f" (did you mean {close[0].lstrip('-').replace('-', '_')}?)" if close else ""
                raise NexusError(f"{source}: stages.{name}.{key}: `nexus {name}` has no option {flag}{hint}")
        args = build_stage_args(name, stage_argv(ctx, name), source)
        check = getattr(verb_module(name), "check_options", None)
        if check is not None:
            try:
                check(args)
            except NexusError as e:
                raise NexusError(f"{source}: stage '{name}': {e}") from None
        given = {"--" + str(k).replace("_", "-") for k in ctx.cfg["stages"].get(name) or {}}
        for flag, producer in stage.needs.items():
            if flag in given or is_complete(ctx, producer) or not stage.needed_if.get(flag, lambda _: True)(ctx):
                continue
            if producer in names and names.index(producer) < names.index(name):
                continue
            key = flag.lstrip("-").replace("-", "_")
            if ctx.enabled(producer):
                raise NexusError(f"{source}: stage '{name}' needs {flag} {ctx.out(producer)}, the output of stage "
                                 f"'{producer}', which does not exist and is not run here (run without "
                                 f"--from/--only, or --from {producer})")
            raise NexusError(f"{source}: stage '{name}' needs {flag}: add a '{producer}' stage, or set "
                             f"stages.{name}.{key} to an existing {producer} output")


def is_complete(ctx: Context, name: str) -> bool:
    stage = ctx.table[name]
    out = Path(ctx.out(name))
    return (out / stage.done).exists() if stage.done else out.exists()


def plan_stages(cfg: dict, start: str | None = None, only: str | None = None) -> list[str]:
    names = [s for s in STAGES if s in cfg["stages"] and cfg["stages"][s] is not False]
    if only:
        if only not in names:
            raise NexusError(f"--only {only}: not a stage of this config ({', '.join(names)})")
        return [only]
    if start:
        if start not in names:
            raise NexusError(f"--from {start}: not a stage of this config ({', '.join(names)})")
        return names[names.index(start):]
    return names


def run_pipeline(cfg: dict, base_dir: str | Path, start: str | None = None, only: str | None = None,
                 dry_run: bool = False, timings: dict | None = None, source: str = "pipeline config") -> list[str]:
    """Run the stages of a loaded config (paths relative to `base_dir`); returns the stages that ran.

    Every stage is checked (`check_config`) before anything runs or is written; `source` names the
    config in errors."""
    names = plan_stages(cfg, start, only)
    check_config(Context(cfg, Path(base_dir), write_data=False), names, source, check_paths=not dry_run)
    ctx = Context(cfg, Path(base_dir), write_data=not dry_run)
    if not dry_run:
        Path(ctx.work_dir).mkdir(parents=True, exist_ok=True)
    forced = set(names) if (start or only) else set()
    ran = []
    for name in names:
        stage = ctx.table[name]
        argv = stage_argv(ctx, name)
        if name not in forced and is_complete(ctx, name):
            print(f"[pipeline] {name}: complete, skipping ({ctx.out(name)})")
            continue
        out = Path(ctx.out(name))
        if name in forced and out.exists():
            previous = out.with_name(out.name + ".previous")
            if not dry_run:
                if previous.exists():
                    shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
                out.rename(previous)
            print(f"[pipeline] {name}: rerun; the earlier output is kept as {previous}")
        elif stage.resume and (out.exists() or not stage.resume_if_exists):
            argv += list(stage.resume)
        print(f"[pipeline] {name}: nexus {name} {shlex.join(argv)}")
        if dry_run:
            continue
        args = build_stage_args(name, argv, source)
        mod = verb_module(name)
        t0 = time.time()
        code = mod.run(args)
        if code:
            raise NexusError(f"pipeline stage '{name}' failed with exit code {code}")
        elapsed = time.time() - t0
        if timings is not None:
            timings[name] = elapsed
        print(f"[pipeline] {name}: done in {elapsed:.1f}s -> {ctx.out(name)}")
        ran.append(name)
    return ran
