"""Command-line flags generated from a verb's settings dataclass: one definition per setting.

    @dataclass
    class Settings:
        batch_size: int = flag(1, "sequences per micro-batch")
        dtype: str = flag("auto", "dtype of the base", choices=DTYPE_CHOICES, type=dtype_name)

    add_flags(parser_or_group, Settings, ["batch_size", "dtype"])   # --batch-size, --dtype
    settings = from_args(Settings, args)

A field's name is its flag (`batch_size` -> `--batch-size`), its default is the flag's default, its
help and argparse options live in the field's metadata (the help gains "(default X)"). Types come from the annotation: `int`,
`float`, `str` (optionally `| None`); a `bool` defaulting to False is a `store_true` switch, one
defaulting to None takes `--x/--no-x`; `negate="--no-pack"` makes a True-by-default bool a switch
that turns it off. The defaults a CLI shows, the Python API uses and the tests see are the same values.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

_MISSING = dataclasses.MISSING
_SIMPLE = {"int": int, "float": float, "str": str, "bool": bool}


def flag(default: Any = _MISSING, help: str | None = None, **options) -> Any:
    """A dataclass field that is also a flag. `options` go to `add_argument` (choices, metavar, type,
    required, negate="--no-x" for a bool that is on by default)."""
    meta = {"help": help, **options}
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(annotation) -> type:
    """The type of `int`, `int | None`, `Optional[int]` (as an annotation or its string)."""
    if isinstance(annotation, str):
        names = [p.strip() for p in annotation.split("|") if p.strip() != "None"]
        if len(names) != 1 or names[0] not in _SIMPLE:
            raise TypeError(f"flags: unsupported annotation {annotation!r}")
        return _SIMPLE[names[0]]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"flags: unsupported annotation {annotation!r}")
        return rest[0]
    return annotation


def add_flags(parser, cls, names: list[str]) -> None:
    """Add the flags of `cls`'s fields `names` to an argparse parser or argument group."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = by_name[name]
        _add(parser, name, f.type, f.default, dict(f.metadata))


def add_function_flags(parser, func, specs: dict[str, dict], aliases: dict[str, str] | None = None) -> None:
    """Flags for parameters of `func`, whose signature holds their defaults and types (litgpt's way).

    specs: {parameter: {"help": ..., argparse options, "option": "--other-name", "negate": "--no-x"}};
    aliases: {flag: another spelling of it}.
    """
    import inspect

    params = inspect.signature(func).parameters
    for name, meta in specs.items():
        p = params[name]
        default = _MISSING if p.default is inspect.Parameter.empty else p.default
        _add(parser, name, p.annotation, default, dict(meta), aliases or {})


def function_args(args: argparse.Namespace, specs: dict[str, dict]) -> dict:
    """The keyword arguments that `add_function_flags(parser, func, specs)` parsed into `args`."""
    return {name: getattr(args, name) for name in specs}


def _add(parser, name: str, annotation, default, meta: dict, aliases: dict[str, str] | None = None) -> None:
    try:
        kind = _base_type(annotation)
    except TypeError:
        if "type" not in meta:  # e.g. `int | str`: the spec names its parser
            raise
        kind = None
    option = meta.pop("option", "--" + name.replace("_", "-"))
    negate = meta.pop("negate", None)
    kwargs = {k: v for k, v in meta.items() if v is not None}
    if option != "--" + name.replace("_", "-"):
        kwargs["dest"] = name
    if default is _MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
        if not (default is None or isinstance(default, bool)) and "default" not in kwargs.get("help", "default"):
            kwargs["help"] += f" (default {default})"
    if kind is bool:
        kwargs.pop("dest", None)
        if negate:
            if default is not True:
                raise TypeError(f"flags: {name} has negate= but defaults to {default!r}")
            parser.add_argument(negate, dest=name, action="store_false", **kwargs)
        elif default is None:
            parser.add_argument(option, dest=name, action=argparse.BooleanOptionalAction, **kwargs)
        elif default is False:
            parser.add_argument(option, dest=name, action="store_true", **kwargs)
        else:
            raise TypeError(f"flags: bool {name} defaulting to True needs negate='--no-...'")
        return
    kwargs.setdefault("type", kind)
    parser.add_argument(*[option] + ([aliases[option]] if aliases and option in aliases else []), **kwargs)


def from_args(cls, args: argparse.Namespace):
    """An instance of `cls` from parsed arguments (fields the namespace lacks keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
