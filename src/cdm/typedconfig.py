"""Settings dataclasses from nested dicts (a parsed TOML/JSON file, dotted ``key=value`` overrides)
and back: every value coerced to its field's type or refused with one line that names the key, an
unknown key answered with the nearest valid one. Knows nothing of what the settings mean: the stage
schema that uses it is :mod:`cdm.config`."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any

from .errors import CdmError


class ConfigError(CdmError, ValueError):
    """A config file or override is wrong; the message says what to change."""


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(value: Any) -> str:
    """A value as an error message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a parsed TOML/JSON value (or a CLI string) into the field's type, or raise a
    :class:`ConfigError` naming ``key``. Numbers must be finite; a bool is not a number; an
    integer field takes a float only when it is whole."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table of settings ([{key}] in TOML), got {_describe(value)}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.strip().strip("[]").split(",")) if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list (e.g. {key}=1,2), got {_describe(value)}")
        return [coerce(v, item, key) for v in value]
    if tp is bool:
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {_describe(value)}")
    if tp in (int, float):
        what = "an integer" if tp is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key} must be {what}, got {_describe(value)}")
        try:
            num = float(value) if isinstance(value, str) and tp is float else value
            if isinstance(value, str) and tp is int:
                num = int(value.strip())
        except ValueError:
            raise ConfigError(f"{key} must be {what}, got {_describe(value)}") from None
        if isinstance(num, float) and not math.isfinite(num):
            raise ConfigError(f"{key} must be a finite number, got {_describe(value)}")
        if tp is int and num != int(num):
            raise ConfigError(f"{key} must be an integer, got {_describe(value)}")
        try:
            return tp(num)
        except OverflowError:
            raise ConfigError(f"{key} is too large, got {_describe(value)}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string (quoted in TOML), got {_describe(value)}")
        return value
    return value


def _unknown(key: str, valid: list[str], prefix: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key {prefix}{key}{hint}")


def from_dict(cls: type, d: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys."""
    if not isinstance(d, dict):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where} must be a table of key = value settings, got {_describe(d)}")
    types = _field_types(cls)
    kwargs = {}
    for k, v in d.items():
        if k not in types:
            raise _unknown(k, list(types), prefix)
        kwargs[k] = coerce(v, types[k], prefix + k)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"cannot set {dotted}: {k} is not a table")
    d[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """``["train.steps=100", "unet.channel_mult=1,2"]`` -> nested dict of strings."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
        k, v = item.split("=", 1)
        set_dotted(out, k.strip(), v.strip())
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
