"""Typed settings of the evaluation jobs.

Each job has one frozen dataclass of settings (RetrievalConfig, VQAConfig, ...). Its field
defaults are the only defaults: `add_config_arguments` builds the job's command-line options from
the fields and `config_from_mapping` builds the config from a nightly suite entry. Values are
checked in one place, when the config is built, so the CLI, the suite and a Python caller get the
same one-line error.

    @dataclass(frozen=True)
    class ZeroShotConfig(JobConfig):
        dataset: Path = setting(REQUIRED, "ImageFolder or webdataset root")
        batch_size: int = setting(64, "images per encoder batch", minimum=1)
"""
from __future__ import annotations

import argparse
import math
import typing
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any

from vlp.pipeline.cli_help import nonnegative_int, positive_int
from vlp.pipeline.data.errors import UserError

REQUIRED: Any = MISSING  # a setting without a default: the CLI marks its option required


def setting(default: Any, help: str, *, flag: str | None = None, minimum: float | None = None,
            location: bool = False) -> Any:
    """A config field: its default, its help text, its CLI flag when not `--<name>`, the least
    value a number may take, and for a str field whether it names a file or URL (a suite
    resolves it like a Path field unless it is a URL)."""
    metadata = {"help": help, "flag": flag, "minimum": minimum, "location": location}
    if isinstance(default, (list, dict, set)):
        raise TypeError("a setting's default must be immutable (use a tuple)")
    return field(default=default, metadata=metadata)


class JobConfig:
    """Base of the jobs' settings dataclasses: every field is checked against its annotation
    and minimum when the config is built; `check` adds a job's rules across fields."""

    def __post_init__(self) -> None:
        for spec in fields(self):
            object.__setattr__(self, spec.name, _checked(self, spec, getattr(self, spec.name)))
        self.check()

    def check(self) -> None:
        """Rules that involve several fields (raise UserError)."""


def add_config_arguments(parser: argparse.ArgumentParser, config_type: type[JobConfig]) -> None:
    """One option per field of `config_type`, with the field's help and default in its text.
    Options left out of the command line are absent from the namespace (the config's default
    applies), so argparse holds no second copy of the defaults."""
    for spec in fields(config_type):
        kind, optional, many = _field_type(config_type, spec)
        flag = spec.metadata["flag"] or "--" + spec.name.replace("_", "-")
        options: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS,
                                   "help": _help(spec)}
        if kind is bool:
            options["action"] = (argparse.BooleanOptionalAction if spec.default is True
                                 else "store_true")
        else:
            options["type"] = _parser_type(kind, spec.metadata["minimum"])
            options["metavar"] = flag.lstrip("-").replace("-", "_").upper()
            options["required"] = spec.default is MISSING
            if many:
                options["action"], options["nargs"] = "extend", "+"
        parser.add_argument(flag, **options)


def config_from_args(config_type: type[JobConfig], args: argparse.Namespace) -> JobConfig:
    """The config of the options given on the command line (the defaults for the others)."""
    given = vars(args)
    return config_type(**{s.name: given[s.name] for s in fields(config_type) if s.name in given})


def config_from_mapping(config_type: type[JobConfig], values: dict, where: str,
                        base: Path | None = None) -> JobConfig:
    """The config of a suite entry's `values`; relative paths are resolved against `base`.
    Unknown keys and values of the wrong type are errors that start with `where`."""
    valid = [s.name for s in fields(config_type)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    missing = [s.name for s in fields(config_type) if s.default is MISSING and s.name not in values]
    if missing:
        raise UserError(f"{where}: missing key(s) {missing}")
    values = dict(values)
    for spec in fields(config_type):
        names_file = spec.metadata["location"] or _field_type(config_type, spec)[0] is Path
        if base is not None and spec.name in values and names_file:
            values[spec.name] = _resolved(values[spec.name], base)
    try:
        return config_type(**values)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from exc


def _resolved(value: Any, base: Path) -> Any:
    """A relative file name joined to `base`; URLs (s3://...) and other values unchanged."""
    if isinstance(value, (list, tuple)):
        return [_resolved(v, base) for v in value]
    if isinstance(value, str) and "://" not in value:
        return str(base / value)
    return value


def _field_type(config_type: type, spec: Field) -> tuple[type, bool, bool]:
    """(element type, None allowed, a tuple of them) from the field's annotation."""
    hint = typing.get_type_hints(config_type)[spec.name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def _checked(config: JobConfig, spec: Field, value: Any) -> Any:
    """`value` in the field's type (a str becomes a Path, an int a float, a list a tuple), or
    UserError naming the field."""
    kind, optional, many = _field_type(type(config), spec)
    if value is None and optional:
        return None
    if many:
        items = [value] if isinstance(value, (str, Path)) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise UserError(f"{spec.name} must be a non-empty list of {kind.__name__}, "
                            f"got {value!r:.60}")
        return tuple(_one(spec, kind, item) for item in items)
    return _one(spec, kind, value)


def _one(spec: Field, kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, (str, Path)) and str(value):
        return Path(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise UserError(f"{spec.name} must be {kind.__name__}, got {value!r:.60}")
    if kind is float and not math.isfinite(value):
        raise UserError(f"{spec.name} must be a finite number, got {value}")
    least = spec.metadata["minimum"]
    if least is not None and value < least:
        raise UserError(f"{spec.name} must be >= {least}, got {value}")
    return value


def _parser_type(kind: type, minimum: float | None):
    """argparse `type=` for a field: counts keep argparse's own one-line error."""
    if kind is int and minimum == 1:
        return positive_int
    if kind is int and minimum == 0:
        return nonnegative_int
    return kind


def _help(spec: Field) -> str:
    text = spec.metadata["help"]
    default = spec.default
    if default is MISSING or default is None or default is False or "(default" in text:
        return text
    shown = " ".join(default) if isinstance(default, tuple) else default
    return f"{text} (default: {shown})"
