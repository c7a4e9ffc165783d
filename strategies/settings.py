"""Typed settings: dataclasses whose fields carry their help text, loaded from plain mappings.

The one loader of the project: every config section (strategy, data, train, a whole run config, a tune
space's `sweep:`) is built by ``from_dict``, which refuses unknown keys with one "did you mean", coerces
YAML values to the field types, and runs the class's ``validate(where)`` once the object is built, so a
bad value fails before anything expensive starts. Pure Python: the CLI reads the help text from here too.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
from typing import Any, Iterable

from strategies.errors import SettingsError


MAX_INT = 2**53  # beyond it an int64 counter or a float conversion goes wrong silently


def setting(default, help: str, **kw):
    """A dataclass field with its help text; mutable defaults are copied per instance."""
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def help_of(cls) -> dict[str, str]:
    """Field name -> help text of a settings dataclass."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean `x`?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], 1)
    return f" (did you mean `{close[0]}`?)" if close else ""


def unknown_keys_error(where: str, unknown: Iterable[str], known: Iterable[str], error=SettingsError):
    known = list(known)
    hints = ", ".join(f"`{k}`{did_you_mean(k, known)}" for k in unknown)
    return error(f"{where}: unknown key {hints}. Allowed keys: {', '.join(known)}.")


def from_dict(cls, data: Any, where: str, error: type[Exception] = SettingsError):
    """Build dataclass ``cls`` from a mapping: unknown keys and wrong types are ``error``s naming the field;
    nested settings are built the same way; ``validate(where)`` runs on every object built."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise error(f"{where}: expected a mapping of keys, got {type(data).__name__} {data!r}.")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise unknown_keys_error(where, unknown, known, error)
    hints = _type_hints(cls)
    kwargs = {key: _coerce(hints[key], value, f"{where}.{key}", error) for key, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field missing
        raise error(f"{where}: {err}") from None
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> dict:
    """The resolved field types of a settings class (resolving them is most of a config load's cost)."""
    return typing.get_type_hints(cls)


def _coerce(tp, value, where: str, error):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, error)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(arg, value, where, error)
            except (SettingsError, error) as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise error(f"{where} = {value!r}: expected {_type_name(tp)}.")
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float range
                number = math.inf
            if not math.isfinite(number):  # NaN passes every `x < 0` check below it: refuse it here, once
                raise error(f"{where} = {value!r}: must be a finite number.")
            return number
        raise error(f"{where} = {value!r}: expected a number.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:  # would overflow a tensor or a C long far from here, without a field name
                raise error(f"{where} = {value}: must be at most {MAX_INT} in size; use a smaller value.")
            return value
        raise error(f"{where} = {value!r}: expected an integer.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise error(f"{where} = {value!r}: expected true or false.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise error(f"{where} = {value!r}: expected a string.")
    if origin is list:
        if not isinstance(value, list):
            raise error(f"{where} = {value!r}: expected a list.")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, v, f"{where}[{i}]", error) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise error(f"{where} = {value!r}: expected a mapping.")
        _, item = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(item, v, f"{where}.{k}", error) for k, v in value.items()}
    return value  # Any


def _type_name(tp) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp) if a is not type(None))
