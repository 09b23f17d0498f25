"""Typed settings for the stages, built from the JSON a Snakemake rule passes on the command line.

Each stage takes one frozen dataclass; `from_mapping` refuses unknown keys and wrong
types with the key's name, so a typo in a hand-run command fails as clearly as the
schema check does in the Snakefile.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from evspec.errors import InputError

SettingsT = TypeVar("SettingsT")


def from_mapping(cls: type[SettingsT], values: Mapping[str, Any] | str | None, source: str) -> SettingsT:
    """Build dataclass `cls` from a mapping or a JSON object string; defaults fill the rest."""
    if values is None:
        values = {}
    if isinstance(values, str):
        try:
            values = json.loads(values)
        except json.JSONDecodeError as error:
            raise InputError(source, f"not valid JSON: {error}") from error
    if not isinstance(values, Mapping):
        raise InputError(source, f"expected a JSON object, got {type(values).__name__}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InputError(source, f"unknown keys {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    converted = {}
    for key, value in values.items():
        converted[key] = _convert(hints[key], value, f"{source}.{key}")
    return cls(**converted)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, key)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise InputError(key, f"expected a mapping, got {value!r}")
        value_hint = typing.get_args(hint)[1]
        return {str(k): _convert(value_hint, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise InputError(key, f"expected a list, got {value!r}")
        item_hint = typing.get_args(hint)[0]
        return tuple(_convert(item_hint, item, key) for item in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise InputError(key, f"expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def to_json(settings: Any) -> str:
    """The canonical JSON of a settings dataclass (sorted keys): what fingerprints hash."""
    return json.dumps(dataclasses.asdict(settings), sort_keys=True)
