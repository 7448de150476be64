"""Typed configs: YAML files validated into dataclasses, with `key.sub=value` overrides.

A recipe is one YAML file. `load_config(Schema, path, overrides)` reads it, applies the command-line
overrides, and builds the dataclass tree `Schema`, checking every value against its annotation. Every
error names the file (or the override) and the dotted key, and says what was expected:

    configs/timeseries/etth1.yaml: train.optimizer.lr: expected float, got 'fast' (str)
    configs/timeseries/etth1.yaml: unknown key 'train.lrr' (did you mean 'lr'?)
    configs/timeseries/etth1.yaml: missing required key 'data.path'

Supported annotations: bool, int, float, str, Path, None, Optional/Union, Literal, list[T], tuple[T, ...],
tuple[A, B], dict[str, T], Any, nested dataclasses, and tagged unions of dataclasses (each member has a
`name: Literal[...]` field; the value's `name` picks the member).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

__all__ = ["ConfigError", "load_config", "from_dict", "to_dict", "save_config", "parse_overrides", "apply_overrides"]


class ConfigError(ValueError):
    """A config file or override does not match its schema. The message names the source and the key."""


_MISSING = object()


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                data: dict | None = None) -> T:
    """Build `schema` from a YAML file (or `data`), after applying `key.sub=value` overrides. `path` is a
    file, or the name of a recipe that ships with mambakit (`mambakit.engine.recipes.resolve_recipe`)."""
    source = str(path) if path is not None else "<config>"
    if path is not None:
        from .recipes import resolve_recipe      # `path` may also name a packaged recipe (`smamba_custom`)

        path = resolve_recipe(path)
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    return from_dict(schema, data, source)


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """`["train.lr=1e-3", "model.name=dlinear"]` -> `[("train.lr", "1e-3"), ...]`, values parsed as YAML."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}': expected KEY.SUB=VALUE")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Return a copy of `data` with each `key.sub=value` set (creating intermediate mappings)."""
    data = _deep_copy(data)
    for key, value in parse_overrides(overrides):
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{key}={value}': '{'.'.join(parts[:i + 1])}' is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def from_dict(schema: type[T], data: Any, source: str = "<config>") -> T:
    """Validate `data` (plain dicts/lists/scalars) into an instance of the dataclass `schema`."""
    return _convert(schema, data, source, "")


def to_dict(config: Any) -> Any:
    """The inverse of `from_dict`: plain dicts, lists and scalars, ready for YAML or JSON."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (the run folder keeps exactly what ran)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


# --------------------------------------------------------------------------------------------------
# conversion

def _where(source: str, key: str) -> str:
    return f"{source}: {key}" if key else source


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    return str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, source, key)
    if origin is Literal:
        allowed = get_args(tp)
        # True == 1 in Python: a bool matches only a Literal that lists bools.
        if value in allowed and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed)):
            return value
        raise ConfigError(f"{_where(source, key)}: expected {_type_name(tp)}, got {_describe(value)}")
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, source, key)
    if origin in (list, Sequence, typing.Sequence) or tp is list:
        (item_tp,) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(source, key)}: expected a list, got {_describe(value)}")
        return [_convert(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        return _convert_tuple(tp, value, source, key)
    if origin is dict or tp is dict:
        key_tp, val_tp = get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(source, key)}: expected a mapping, got {_describe(value)}")
        return {_convert(key_tp, k, source, f"{key}.{k}"): _convert(val_tp, v, source, f"{key}.{k}")
                for k, v in value.items()}
    return _convert_scalar(tp, value, source, key)


def _convert_union(tp: Any, value: Any, source: str, key: str) -> Any:
    members = get_args(tp)
    if value is None:
        if type(None) in members:
            return None
        raise ConfigError(f"{_where(source, key)}: expected {_type_name(tp)}, got null")
    members = [m for m in members if m is not type(None)]
    tagged = [m for m in members if dataclasses.is_dataclass(m) and _tag_values(m)]
    if tagged and isinstance(value, dict):
        return _convert_tagged(tagged, value, source, key)
    errors = []
    for member in members:
        try:
            return _convert(member, value, source, key)
        except ConfigError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    raise ConfigError(f"{_where(source, key)}: expected {_type_name(tp)}, got {_describe(value)}")


def _tag_values(cls: type) -> tuple:
    hints = get_type_hints(cls)
    tag = hints.get("name")
    return get_args(tag) if get_origin(tag) is Literal else ()


def _convert_tagged(members: list[type], value: dict, source: str, key: str) -> Any:
    options = {tag: m for m in members for tag in _tag_values(m)}
    name = value.get("name", _MISSING)
    where = _where(source, f"{key}.name" if key else "name")
    if name is _MISSING:
        raise ConfigError(f"{where}: missing required key; expected one of {', '.join(map(repr, options))}")
    if name not in options:
        raise ConfigError(f"{where}: unknown name {name!r}; expected one of {', '.join(map(repr, options))}")
    return _convert_dataclass(options[name], value, source, key)


def _convert_tuple(tp: Any, value: Any, source: str, key: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{_where(source, key)}: expected a list, got {_describe(value)}")
    args = get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if args and len(args) != len(value):
        raise ConfigError(f"{_where(source, key)}: expected a list of {len(args)} items, got {len(value)}")
    if not args:
        return tuple(value)
    return tuple(_convert(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _convert_scalar(tp: Any, value: Any, source: str, key: str) -> Any:
    where = _where(source, key)
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads `7e-5` (no dot) as a string; accept every float literal Python accepts.
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and math.isfinite(number) or value.strip().lower() in ("inf", "-inf", "+inf"):
                return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    else:
        raise ConfigError(f"{where}: unsupported annotation {tp!r} in the schema")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_describe(value)}")


def _convert_dataclass(cls: type, value: Any, source: str, key: str) -> Any:
    where = _where(source, key) if key else source
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of keys for {cls.__name__}, got {_describe(value)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in value:
        if name not in fields:
            full = f"{key}.{name}" if key else str(name)
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(fields)})"
            raise ConfigError(f"{source}: unknown key '{full}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        full = f"{key}.{name}" if key else name
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], source, full)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{full}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        # __post_init__ checks raise ValueError; name where they came from.
        raise ConfigError(f"{where}: {e}") from None


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
