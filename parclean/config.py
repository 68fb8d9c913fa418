"""Frozen-dataclass configs loaded from YAML: unknown keys rejected, overrides applied, resolved copy written."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the fix."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build `cls` from a YAML file (optional) and then `overrides` (dotted keys allowed: `model.steps`)."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', err)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        data = loaded or {}
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted.split("."), value)
    return from_dict(cls, data, source)


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build a (possibly nested) frozen dataclass from a plain dict, rejecting unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting(s) {', '.join(prefix + k for k in unknown)}; "
            f"known: {', '.join(prefix + k for k in fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        nested = _dataclass_in(kind)
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value, source, prefix=f"{prefix}{name}.")
        kwargs[name] = _coerce(value, kind, source, prefix + name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able data."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def write_resolved(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (YAML) beside an output."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def script_parser(description: str) -> argparse.ArgumentParser:
    """A command-line parser with --config, --out and repeatable --set KEY=VALUE, for the training scripts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    return parser


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def _dataclass_in(kind: Any) -> type | None:
    """The dataclass a field holds (also inside `X | None`), or None."""
    if dataclasses.is_dataclass(kind):
        return kind
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        found = [arg for arg in typing.get_args(kind) if dataclasses.is_dataclass(arg)]
        return found[0] if len(found) == 1 else None
    return None


def _set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
    data[keys[-1]] = value


def _coerce(value: Any, kind: Any, source: str, name: str) -> Any:
    """Accept what YAML gives for the declared type (ints for floats, lists for tuples); reject the rest."""
    if dataclasses.is_dataclass(kind):
        if isinstance(value, dict):
            return from_dict(kind, value, source, prefix=f"{name}.")
        if not dataclasses.is_dataclass(value):
            raise ConfigError(f"{source}: {name} must be a mapping of settings, got {value!r}")
        return value
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, source, name)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: {name}={value!r} does not fit {kind}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {name} must be a list, got {value!r}")
        args = typing.get_args(kind)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, source, name) for v in value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        # YAML 1.1 reads 3e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{source}: {name} must be a number, got {value!r}") from None
    if kind in (int, str, bool) and not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {name} must be {kind.__name__}, got {value!r}")
    return value
