"""Typed configs: frozen dataclasses whose values are checked against their annotations.

One validation path for every config edgeslim reads: compressor configs and the recipe sections
([[step]], [export], [profile], the top level). Supported annotations: int, float (ints are
accepted and converted), bool, str, Literal[...], X | None, tuple[X, ...] / list[X] (a list in
TOML or JSON becomes a tuple), unions such as int | tuple[int, ...], and dict[str, X]. Text from
the command line (`--set ratio=0.3`) is converted by the same annotations with `parse_text`.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Union

from edgeslim.core.errors import ConfigError


class _Mismatch(Exception):
    """A value does not fit one annotation (turned into a ConfigError naming the field)."""


def describe(tp: Any) -> str:
    """What a value of annotation `tp` looks like, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "none"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        names = [repr(a) for a in args]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
        return f"a list (each item {describe(args[0]) if args else 'any value'})"
    if origin in (dict, Mapping):
        return f"a table (each value {describe(args[1]) if args else 'any value'})"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _text(value: str, tp: Any) -> Any:
    """Command-line text converted toward annotation `tp` (raises _Mismatch when it cannot be)."""
    origin = typing.get_origin(tp)
    try:
        if tp is int:
            return int(value)
        if tp is float:
            return float(value)
    except ValueError:
        raise _Mismatch from None
    if tp is bool:
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _Mismatch
    if origin in (tuple, list, dict, Mapping) or tp is type(None):
        if value.lower() in ("none", "null") and tp is type(None):
            return None
        if value.startswith(("[", "{")):
            try:
                return tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                raise _Mismatch from None
        if origin in (tuple, list):
            return [part.strip() for part in value.split(",")]
        raise _Mismatch
    return value


def _coerce(value: Any, tp: Any, text: bool) -> Any:
    """`value` checked against annotation `tp` (ints widened to float, lists to tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in args:
            try:
                return _coerce(value, arm, text)
            except _Mismatch:
                continue
        raise _Mismatch
    if text and isinstance(value, str) and tp is not str and origin is not Literal:
        value = _text(value, tp)
        text = isinstance(value, list) and origin in (tuple, list)  # split items are text too
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_coerce(v, a, text) for v, a in zip(value, args))
        item = args[0] if args else Any
        items = [_coerce(v, item, text) for v in value]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        item = args[1] if args else Any
        return {k: _coerce(v, item, text) for k, v in value.items()}
    raise TypeError(f"config annotation {tp!r} is not supported (see edgeslim/core/config.py)")


def check_value(value: Any, tp: Any, key: str, where: str, text: bool = False) -> Any:
    """`value` of field `key` checked (and converted) against annotation `tp`.

    Raises:
        ConfigError: naming `where`, the key, the expected type and the value.
    """
    try:
        return _coerce(value, tp, text)
    except _Mismatch:
        raise ConfigError(f"{where}: '{key}' must be {describe(tp)}, got {value!r}") from None


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each dataclass field of `cls`."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """What each dataclass field of `cls` means: the comment beside it, or the comment lines just above
    it, in the nearest class that declares it with one ("" when none does)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        declared = klass.__dict__.get("__annotations__", {})
        if not declared or not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # no source (a class built at run time)
            continue
        above: list[str] = []
        for line in lines:
            text = line.strip()
            if text.startswith("#"):
                above.append(text.lstrip("#").strip())
                continue
            match = re.match(r"\s+(\w+)\s*:", line)
            doc = line.partition("  # ")[2].strip() or " ".join(above)
            if match and match.group(1) in declared and doc:  # a bare redeclaration keeps the inherited meaning
                docs[match.group(1)] = doc
            above = []
    return {name: docs.get(name, "") for name in field_types(cls)}


@dataclass(frozen=True)
class ConfigBase:
    """Base of every config: frozen, typed from its annotations, unknown keys are errors.

    Defaults live on the dataclass fields only. A default that depends on the call (e.g. the
    allocation when calibration data is given) is a named value such as "auto" that one method
    resolves, and the resolved config is what a manifest records. Range and cross-field checks go
    in `validate()` (subclasses do not define __post_init__, which runs the type checks).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__post_init__" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: put checks in validate(), not __post_init__ (it runs the type checks)")

    def __post_init__(self) -> None:
        for key, tp in field_types(type(self)).items():
            object.__setattr__(self, key, check_value(getattr(self, key), tp, key, type(self).__name__))
        self.validate()

    def validate(self) -> None:
        """Range and cross-field checks (ConfigError); the types are already checked."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | None = None) -> "ConfigBase":
        """Build the config from a mapping (recipe section, CLI options, manifest).

        Raises:
            ConfigError: a key is not a field (the allowed ones are listed), a field without a
                default is missing, or a value does not have the field's type.
        """
        where = where or cls.__name__
        types_ = field_types(cls)
        unknown = sorted(set(data) - set(types_))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {list(types_)}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"{where}: '{missing[0]}' is required")
        return cls(**{k: check_value(v, types_[k], k, where) for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the fields (tuples become lists)."""
        def plain(v: Any) -> Any:
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def parse_text(cls: type[ConfigBase], key: str, text: str, where: str | None = None) -> Any:
    """A command-line value for field `key` of `cls`, converted by its annotation.

    A key that is not a field is returned unchanged, so that `from_dict` reports it with the
    allowed keys.

    Raises:
        ConfigError: the text does not convert (key, expected type and value named).
    """
    types_ = field_types(cls)
    if key not in types_:
        return text
    return check_value(text, types_[key], key, where or cls.__name__, text=True)
