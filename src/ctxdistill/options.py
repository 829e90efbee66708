"""Typed options: dataclass fields that carry their CLI help and allowed values, YAML loading, type checks.

Every option is a dataclass field made with `opt`, so `--help`, the YAML schema and validation cannot
drift apart. Config classes (`TrainConfig` and its method sections, `EvalConfig`, `SweepConfig`, ...)
are built with `build_config`: YAML values first, then explicit overrides, every value type-checked.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from pathlib import Path

import yaml

from .errors import CtxDistillError


def opt(default, help: str, choices: tuple | None = None):
    """A dataclass field with CLI help (and allowed values) attached."""
    return field(default=default, metadata={"help": help, "choices": choices})


def opt_list(default: list, help: str):
    return field(default_factory=lambda: list(default), metadata={"help": help, "choices": None})


def opt_dict(help: str):
    return field(default_factory=dict, metadata={"help": help, "choices": None})


def check_choices(cfg) -> None:
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise CtxDistillError(f"unknown {f.name} {value!r}; choose one of: {', '.join(map(str, choices))}")


def require(cfg, names, test, what: str) -> None:
    """Raise naming the first of `names` whose value fails `test` (`what` says what it must be)."""
    for name in names:
        value = getattr(cfg, name)
        try:
            ok = bool(test(value))
        except TypeError:
            ok = False
        if not ok:
            raise CtxDistillError(f"{name} must be {what}, got {value!r}")


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def field_type(cls, f: dataclasses.Field) -> type:
    """The plain Python type of a field (str, int, float, bool, or a nested config dataclass)."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def coerce_value(cls, f: dataclasses.Field, value):
    """Check a value's type against the field; ints are accepted where floats are expected."""
    kind = field_type(cls, f)
    if value is None and f.default is None:  # optional settings (resume) accept null
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML reads 3e-6 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CtxDistillError(f"option {f.name!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def coerce(cls, name: str, value):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise CtxDistillError(f"unknown option {name!r}; valid options: {', '.join(sorted(fields))}")
    return coerce_value(cls, fields[name], value)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CtxDistillError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise CtxDistillError(f"config file {path} is a directory; pass a YAML file") from None
    except UnicodeDecodeError:
        raise CtxDistillError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise CtxDistillError(f"invalid YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CtxDistillError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls, yaml_path: str | None = None, overrides: dict | None = None):
    """YAML values first, then explicit overrides; every value type-checked, then validated.

    A class with a `from_options` constructor (TrainConfig: sections) builds itself from the merged values.
    """
    values = dict(load_yaml(yaml_path)) if yaml_path else {}
    values.update(overrides or {})
    if hasattr(cls, "from_options"):
        cfg = cls.from_options(values)
    else:
        cfg = cls(**{k: coerce(cls, k, v) for k, v in values.items()})
    return cfg.validate() if hasattr(cfg, "validate") else cfg


def to_dict(cfg) -> dict:
    """A config as plain data (TrainConfig: flat, one key per option, as in run.json and checkpoints)."""
    return cfg.flat() if hasattr(cfg, "flat") else dataclasses.asdict(cfg)
