"""Frozen-dataclass configs loaded from YAML: unknown keys rejected, overrides applied, resolved copy written."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from parclean.paths import looked_for

T = TypeVar("T")
BASE_KEY = "base"  # in any mapping of a config file: the file whose settings it starts from


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the fix."""


class _Yaml12Booleans(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true/false (any case spelling YAML allows). YAML 1.1 also reads
    yes/no/on/off as booleans, which turns `mixed_precision: no` into False; here they stay strings, and
    bool settings accept them (_coerce)."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Yaml12Booleans.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Booleans.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_YAML11_BOOLEANS = {"yes": True, "on": True, "no": False, "off": False}


def read_yaml(text: str) -> Any:
    """YAML as configs read it: yes/no/on/off stay strings (YAML 1.2), so str settings keep them."""
    return yaml.load(text, Loader=_Yaml12Booleans)  # noqa: S506 - a SafeLoader subclass


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where the settings came from, for error messages: a file (or a label) and the keys overrides set."""

    label: str
    is_file: bool = False
    overridden: tuple[str, ...] = ()

    def of(self, name: str) -> str:
        """Who set `name` (dotted): the override of it or of a group holding it, else the file."""
        keys = self._overrides_of([name])
        return f"override {keys[0]}" if keys else self.label

    def of_group(self, names: list[str]) -> str:
        """Who set a group whose settings `names` (dotted) failed a check together: the file, and the overrides
        among them."""
        keys = self._overrides_of(names)
        if not keys:
            return self.label
        return f"{self.label} with override {', '.join(keys)}" if self.is_file else f"override {', '.join(keys)}"

    def _overrides_of(self, names: list[str]) -> list[str]:
        return sorted({key for key in self.overridden for name in names
                       if name == key or name.startswith(key + ".")})


def load_config(cls: type[T], config: str | Path | dict[str, Any] | Any | None = None,
                overrides: dict[str, Any] | None = None) -> T:
    """Build `cls` from a YAML path, a mapping of settings or a `cls` instance (or nothing: the defaults), then
    `overrides` (dotted keys allowed: `model.steps`). The one resolver for every config."""
    source = _Source(f"<{cls.__name__}>", overridden=tuple(overrides or ()))
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, cls):
        data = to_dict(config)
    elif isinstance(config, dict):
        data = _copy_groups(config)
    else:
        source = dataclasses.replace(source, label=str(config), is_file=True)
        data = read_config_file(config)
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted.split("."), value)
    return from_dict(cls, data, source)


def read_config_file(path: str | Path, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The settings of a YAML file, with every `base: FILE` (at any level; FILE relative to the including file)
    replaced by that file's settings, which the mapping's other keys then override."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found{looked_for(path)}")
    if path.resolve() in _including:
        chain = " -> ".join(str(p) for p in (*_including, path.resolve()))
        raise ConfigError(f"{path}: includes itself through base: ({chain})")
    try:
        loaded = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', err)})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return _include_bases(loaded or {}, path, (*_including, path.resolve()))


def _include_bases(data: dict[str, Any], path: Path, including: tuple[Path, ...]) -> dict[str, Any]:
    data = {key: _include_bases(value, path, including) if isinstance(value, dict) else value
            for key, value in data.items()}
    if BASE_KEY not in data:
        return data
    base = data.pop(BASE_KEY)
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: must be the path of a config file, got {base!r}")
    if not (path.parent / base).is_file():
        where = "" if Path(base).is_absolute() else \
            f" (looked for {os.path.abspath(path.parent / base)}: a base is read from this file's folder)"
        raise ConfigError(f"{path}: base: {base} not found{where}")
    return _merged(read_config_file(path.parent / base, including), data)


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` on top: groups of settings merge key by key, any other value replaces."""
    merged = dict(base)
    for key, value in changes.items():
        both_groups = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both_groups else value
    return merged


def from_dict(cls: type[T], data: dict[str, Any], source: str | _Source = "<dict>", prefix: str = "") -> T:
    """Build a (possibly nested) frozen dataclass from a plain dict, rejecting unknown keys."""
    if isinstance(source, str):
        source = _Source(source)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source.of_group([prefix + k for k in unknown])}: unknown setting(s) "
            f"{', '.join(prefix + k for k in unknown)}; known: {', '.join(prefix + k for k in fields)}"
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
        raise ConfigError(f"{source.of_group([prefix + k for k in kwargs])}: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able data."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def write_resolved(cfg: Any, path: str | Path, comments: list[str] | None = None) -> None:
    """Write the resolved config (YAML) beside an output, after `comments` (a header the config loader ignores)."""
    header = "".join(f"# {line}\n" for line in comments or []) + ("# ---\n" if comments else "")
    Path(path).write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as YAML (numbers, lists, true/false; yes/no/on/off stay
    strings, and bool settings accept them)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), read_yaml(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({getattr(err, 'problem', err)})") from None


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
        child = data.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {key} is not a group of settings")
        data = child
    data[keys[-1]] = value


def _copy_groups(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of nested dicts, so overrides never change the caller's mapping."""
    return {key: _copy_groups(value) if isinstance(value, dict) else value for key, value in data.items()}


def _coerce(value: Any, kind: Any, source: _Source, name: str) -> Any:
    """Accept what YAML gives for the declared type (ints for floats, lists for tuples, yes/no/on/off for
    bools); reject the rest, naming who set it."""
    if dataclasses.is_dataclass(kind):
        if isinstance(value, dict):
            return from_dict(kind, value, source, prefix=f"{name}.")
        if not dataclasses.is_dataclass(value):
            raise ConfigError(f"{source.of(name)}: {name} must be a mapping of settings, got {value!r}")
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
        raise ConfigError(f"{source.of(name)}: {name}={value!r} does not fit {kind}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source.of(name)}: {name} must be a list, got {value!r}")
        args = typing.get_args(kind)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, source, name) for v in value)
    if kind is bool and isinstance(value, str) and value.lower() in _YAML11_BOOLEANS:
        return _YAML11_BOOLEANS[value.lower()]
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        # YAML 1.1 reads 3e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{source.of(name)}: {name} must be a number, got {value!r}") from None
    if kind in (int, str, bool) and not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source.of(name)}: {name} must be {kind.__name__}, got {value!r}")
    return value
