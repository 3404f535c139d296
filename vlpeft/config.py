"""One config base for every typed config of the project: method, model, task and training configs.

A config is a dataclass that inherits :class:`Config`. ``from_dict`` builds it from a mapping (YAML,
JSON) with errors that name the key and the nearest valid one, converts numbers written as strings
(YAML reads ``3e-3`` as a string), recurses into dataclass-valued fields and reports missing required
keys; ``to_dict`` is its inverse. Validation by meaning stays in each config's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, TypeVar

from .registry import nearest_hint

C = TypeVar("C", bound="Config")
_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


class ConfigError(ValueError):
    """A bad config value or key: the message names where it is and what was expected."""


def _nested_template(f: dataclasses.Field) -> Any:
    factory = f.default_factory
    return factory() if factory is not dataclasses.MISSING else None


def typed(value: Any, annotation: Any, where: str, error: type[Exception] = ConfigError) -> Any:
    """``value`` checked against a scalar field annotation (``int``, ``float``, ``bool``, ``str``,
    or one of them ``| None``); other annotations pass through. A bool is no int; an int is a
    float; a string is a float only when it reads as one (YAML 1.1 reads ``3e-3`` as a string) —
    an int field takes no string (``r: "8"`` is refused, naming its key)."""
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    optional = name.endswith(" | None")
    kind = _SCALARS.get(name.removesuffix(" | None"))
    if kind is None or (value is None and (optional or kind is str)):
        return value  # (a required string left empty is named by the config's own validation)
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    expected = kind.__name__ + (" or null" if optional else "")
    raise error(f"{where}: expected {expected}, got {value!r}")


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` updated by ``override``, nested mappings merged key by key (neither is changed)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def check(condition: bool, where: str, expected: str, value: Any) -> None:
    """A config value checked by meaning: ``ConfigError("<where> must be <expected>, got …")``."""
    if not condition:
        raise ConfigError(f"{where} must be {expected}, got {value!r}")


def check_finite(config: Any) -> None:
    """Every number in the fields of dataclass ``config`` (inside dicts and lists too) is finite: a
    NaN or inf is a ``ConfigError`` naming the field. No setting means them, and YAML reads
    ``.nan``/``.inf`` as floats that range checks such as ``alpha > 0`` let through.

    Example:
        >>> from vlpeft import LoRAConfig
        >>> LoRAConfig(targets=["q"], alpha=float("nan"))
        Traceback (most recent call last):
        ...
        vlpeft.config.ConfigError: LoRAConfig.alpha must be a finite number, got nan
    """
    for f in dataclasses.fields(config):
        _check_finite(getattr(config, f.name), f"{type(config).__name__}.{f.name}")


def _check_finite(value: Any, where: str) -> None:
    if isinstance(value, float):
        check(math.isfinite(value), where, "a finite number", value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


class Config:
    """Mixin for config dataclasses: ``from_dict`` / ``to_dict`` with nearest-key errors."""

    error: ClassVar[type[Exception]] = ConfigError

    @classmethod
    def from_dict(cls: type[C], data: Any, where: str = "config") -> C:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise cls.error(f"{where}: expected a mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        kwargs = {}
        for key, value in data.items():
            if key not in fields:
                raise cls.error(
                    f"{where}: unknown key {key!r}{nearest_hint(str(key), fields)}; "
                    f"valid keys: {sorted(fields)}"
                )
            template = _nested_template(fields[key])
            if isinstance(template, Config):
                kwargs[key] = type(template).from_dict(value, f"{where}.{key}")
            else:
                kwargs[key] = typed(value, fields[key].type, f"{where}.{key}", cls.error)
        missing = [
            name
            for name, f in fields.items()
            if name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise cls.error(f"{where}: missing key {missing[0]!r}")
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as err:
            # a ConfigError says where it is (a nested from_dict, a dotted path such as
            # ``train.steps``) unless it names the field by its class (``LoRAConfig.alpha``, as
            # check_finite does): that one, like any other error, gets ``where`` (the file)
            located = isinstance(err, cls.error) and not str(err).startswith(f"{cls.__name__}.")
            if located or str(err).startswith(where):
                raise
            raise cls.error(f"{where}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
