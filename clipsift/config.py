"""Typed configs: YAML files under configs/ loaded into dataclasses, overridable with key=value.

Every command has one dataclass. A config file may set any subset of its fields; `key=value`
overrides (dotted keys for nested sections) are applied on top. Unknown keys, values of the
wrong type and values outside a field's declared range (sizes, counts, rates: the Count, Natural,
Positive, NonNegative and Fraction types below) raise ConfigError naming the key, before any work
starts.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

# configs/ beside the package in a source checkout; installed (non-editable) it ships as clipsift/configs
_HERE = Path(__file__).resolve().parent
CONFIG_DIR = next((d for d in (_HERE.parent / "configs", _HERE / "configs") if d.is_dir()), _HERE.parent / "configs")


class ConfigError(ValueError):
    """A config file that cannot be read, a key that does not exist, or a value of the wrong type or range."""


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a numeric field, declared in its type (Annotated[int, Range(min=1)]) so every config
    checks its sizes the same way, when loaded. NaN and infinities are outside every range."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False  # min itself excluded (a positive float)

    def check(self, key: str, value: Any) -> None:
        if value is None:
            return
        low = self.min is not None and (value < self.min or (self.min_open and value == self.min))
        if not math.isfinite(value) or low or (self.max is not None and value > self.max):
            raise ConfigError(f"{key}: {value!r} is out of range; use a value {self}")

    def __str__(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f"{'>' if self.min_open else '>='} {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        return " and ".join(parts) or "that is finite"


# Field types with their range. A size or count of things: Count. Zero allowed (0 = off / auto /
# all): Natural. Learning rates, scales: Positive. Weight decay, exponents: NonNegative.
Count = Annotated[int, Range(min=1)]
Natural = Annotated[int, Range(min=0)]
Positive = Annotated[float, Range(min=0, min_open=True)]
NonNegative = Annotated[float, Range(min=0)]
Fraction = Annotated[float, Range(min=0, max=1)]


def preset_path(group: str, name: str) -> Path:
    """configs/<group>/<name>.yaml, or a clear error listing the presets that exist."""
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        raise ConfigError(f"no preset {name!r} for {group!r}; known presets: {', '.join(known) or 'none'}")
    return path


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build `cls` from an optional YAML file plus `key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror}); check the -c path "
                              "or use -p <preset>") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)}); fix the file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); "
                              "quote it") from None
        _set_dotted(data, key.strip(), value)
    return from_dict(cls, data)


def _yaml_problem(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(e, "problem", None) or e).strip()


def check(cfg: Any, prefix: str = "") -> None:
    """Check a config built in Python (not loaded) against its fields' ranges, sections included."""
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check(value, f"{prefix}{f.name}.")
        else:
            for r in _ranges(hints[f.name]):
                r.check(prefix + f.name, value)


def _ranges(tp: Any) -> list[Range]:
    if get_origin(tp) is Annotated:
        return [m for m in get_args(tp)[1:] if isinstance(m, Range)]
    if get_origin(tp) in (Union, types.UnionType):
        return [r for arg in get_args(tp) for r in _ranges(arg)]
    return []


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s} for {cls.__name__}; known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a missing required field, or a check in __post_init__
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (every field, defaults included) as YAML."""
    from clipsift.runlog import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        inner, *meta = get_args(tp)
        value = _coerce(inner, value, key)
        for m in meta:
            if isinstance(m, Range):
                m.check(key, value)
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "4e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {tp}")
