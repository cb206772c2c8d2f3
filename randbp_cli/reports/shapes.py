"""What a JSON value must be: the checks a report file passes where it is loaded (record.py).

A report is read back from a file a person or a tool may have edited, so its shape is checked
once, where it is loaded: every field against its annotation (`int | None`, `list[str]` ...), and
the keys the code reads out of a field's object against a shape (a dict literal: an object whose
listed keys, where present and not null, have those types; `dict[str, X]`: every value an X). A
mistake is a ReportError that names the key path: `results[2].activation_bytes must be an
integer (got "912MB")`.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass

from ..errors import ReportError


def shown(value) -> str:
    """A JSON value as a message quotes it (cut at 40 characters)."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def at(where: str, key) -> str:
    """The key path one step down: `results` + 2 -> `results[2]`, + `cuda` -> `results[2].cuda`."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else str(key)


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
          list: "a list"}


def _is(value, kind: type) -> bool:
    if isinstance(value, bool) and kind is not bool:  # JSON's true is not the number 1
        return False
    if kind is int:  # a whole number written as 12.0 is still a count
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


@dataclass(frozen=True)
class Nullable:
    """An object shape (a dict literal) that may also be null."""

    shape: dict


def or_null(spec):
    """`spec`, or null."""
    return Nullable(spec) if isinstance(spec, dict) else spec | None


def check_shape(value, spec, where: str) -> None:
    """Raise ReportError unless `value` fits `spec` (a type, `X | None`, `list[X]`, `dict[str, X]`,
    or a dict literal of keys and their specs)."""
    if isinstance(spec, Nullable):
        if value is not None:
            check_shape(value, spec.shape, where)
        return
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ReportError(f"{where} must be an object (got {shown(value)})")
        for key, item_spec in spec.items():
            if value.get(key) is not None:
                check_shape(value[key], item_spec, at(where, key))
        return
    origin, args = typing.get_origin(spec), typing.get_args(spec)
    if origin in (typing.Union, types.UnionType):  # X | None: the reports know no other unions
        if value is not None:
            check_shape(value, next(arg for arg in args if arg is not type(None)), where)
        return
    kind = origin or spec
    if not _is(value, kind):
        raise ReportError(f"{where} must be {_NAMES[kind]} (got {shown(value)})")
    if origin is list and args:
        for index, item in enumerate(value):
            check_shape(item, args[0], at(where, index))
    elif origin is dict and len(args) == 2:
        for key, item in value.items():
            check_shape(item, args[1], at(where, key))
