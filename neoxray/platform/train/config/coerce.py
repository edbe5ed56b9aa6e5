"""Checking and converting config values against the schema's type annotations, with errors that name the
dotted key, the expected type and where the value came from."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

from neoxray.errors import NeoxrayError
from neoxray.platform.train.config.schema import suggest

_HINTS: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation, in field order."""
    if cls not in _HINTS:
        resolved = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: resolved[f.name] for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def _is_union(tp: Any) -> bool:
    import types

    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _describe(tp: Any) -> str:
    if tp is Any:
        return "anything"
    if _is_union(tp):
        args = typing.get_args(tp)
        parts = [_describe(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " or null" if type(None) in args else text
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"a list of {_plural(item)}"
    if origin is dict or tp is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(tp, _describe(tp))


def type_name(v: Any) -> str:
    if v is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(v), type(v).__name__)


class _Mismatch(Exception):
    pass


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """`value` checked against (and converted to) the annotation `tp`; a NeoxrayError naming `key`."""
    try:
        return _convert(value, tp)
    except _Mismatch as e:
        detail = f" ({e})" if str(e) else ""
        raise NeoxrayError(
            f"{key} must be {_describe(tp)}, got {type_name(value)}{'' if value is None else f' {value!r}'}"
            f"{detail} ({source})"
        ) from None


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise _Mismatch()
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Mismatch("not a finite number")
        return value
    if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
        try:
            x = float(value.replace("_", ""))
        except ValueError:
            raise _Mismatch() from None
        if math.isfinite(x):
            return int(x) if x.is_integer() and not any(c in value for c in ".eE") else x
    raise _Mismatch()


def _convert(value: Any, tp: Any) -> Any:
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch()
    if value is None:
        raise _Mismatch()
    origin = typing.get_origin(tp)
    if origin is Literal:
        options = typing.get_args(tp)
        if value in options and type(value) in {type(o) for o in options}:
            return value
        hint = suggest(str(value), [str(o) for o in options]) if isinstance(value, str) else ""
        raise _Mismatch(hint.strip(" ()")) if hint else _Mismatch()
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch()
        (item,) = typing.get_args(tp)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_convert(v, item))
            except _Mismatch:
                raise _Mismatch(f"item {i}: {v!r} is not {_describe(item)}") from None
        return out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch()
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch()
    if tp is int:
        x = _number(value)
        if isinstance(x, float):
            if not x.is_integer():
                raise _Mismatch()
            x = int(x)
        return x
    if tp is float:
        return float(_number(value))
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch()
    raise TypeError(f"unsupported config annotation {tp!r}")  # a bug in this module, not bad input
