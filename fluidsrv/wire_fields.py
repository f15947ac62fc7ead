"""Declarative wire fields: every value :mod:`fluidsrv.protocol` reads, with its bounds, in one declaration.

A field checks a raw JSON value (``check`` returns the parsed value, or None when the value is refused) and
describes itself as JSON Schema (draft 2020-12, as OpenAPI 3.1 and AsyncAPI 3.0 read it). The protocol's parsers
check with the fields and say why in their own words; :mod:`fluidsrv.web.openapi` publishes the same fields'
schemas, so a bound lives in one place. Response shapes are fields too (``Shape``), used only to describe.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

JsonSchema = dict[str, Any]
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class Field(ABC):
    """One value on the wire: what it accepts (``check``) and its JSON Schema (``schema``)."""

    description: str = ""
    default: Any = None

    @abstractmethod
    def check(self, raw: Any) -> Any:
        """Return ``raw`` parsed when this field accepts it, else None."""

    @abstractmethod
    def shape(self) -> JsonSchema:
        """The JSON Schema of the value itself (without description and default)."""

    def schema(self) -> JsonSchema:
        """The JSON Schema of this field, with its description and default when it has them."""
        schema = self.shape()
        if self.description:
            schema["description"] = self.description
        if self.default is not None:
            schema["default"] = self.default
        return schema


def is_integer(raw: Any) -> bool:
    """Whether ``raw`` is a JSON integer (``true`` and ``false`` are not)."""
    return isinstance(raw, int) and not isinstance(raw, bool)


@dataclass(frozen=True)
class Integer(Field):
    """An integer in [low, high] (no upper bound when ``high`` is None)."""

    low: int
    high: int | None = None
    default: int | None = None
    description: str = ""

    def check(self, raw: Any) -> int | None:
        """The integer, or None outside the bounds or for a non-integer."""
        if not is_integer(raw) or raw < self.low or (self.high is not None and raw > self.high):
            return None
        return int(raw)

    def shape(self) -> JsonSchema:
        """``integer`` with ``minimum`` and ``maximum``."""
        bounds = {"minimum": self.low} if self.high is None else {"minimum": self.low, "maximum": self.high}
        return {"type": "integer", **bounds}


@dataclass(frozen=True)
class Number(Field):
    """A finite number (integer or float) in [low, high] (a bound that is None: unbounded that way)."""

    low: float | None = None
    high: float | None = None
    default: float | None = None
    description: str = ""

    def check(self, raw: Any) -> float | None:
        """The number as a float, or None when it is not a finite number within the bounds."""
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            return None
        if isinstance(raw, float) and not math.isfinite(raw):
            return None
        if (self.low is not None and raw < self.low) or (self.high is not None and raw > self.high):
            return None
        return float(raw)

    def shape(self) -> JsonSchema:
        """``number`` with ``minimum`` and ``maximum``."""
        bounds = {"minimum": self.low, "maximum": self.high}
        return {"type": "number", **{key: value for key, value in bounds.items() if value is not None}}


@dataclass(frozen=True)
class Boolean(Field):
    """``true`` or ``false``."""

    default: bool | None = None
    description: str = ""

    def check(self, raw: Any) -> bool | None:
        """The boolean, or None for anything else."""
        return raw if isinstance(raw, bool) else None

    def shape(self) -> JsonSchema:
        """``boolean``."""
        return {"type": "boolean"}


@dataclass(frozen=True)
class Text(Field):
    """A string of ``min_chars`` to ``max_chars`` (None: any) characters, valid Unicode (no lone surrogates)."""

    max_chars: int | None = None
    min_chars: int = 0
    default: str | None = None
    description: str = ""
    pattern: str | None = None  # a regular expression the string must contain a match of (JSON Schema semantics)

    def check(self, raw: Any) -> str | None:
        """The string, or None when it is not a string within the bounds."""
        if not isinstance(raw, str) or len(raw) < self.min_chars or _SURROGATE.search(raw):
            return None
        if self.max_chars is not None and len(raw) > self.max_chars:
            return None
        if self.pattern is not None and re.search(self.pattern, raw) is None:
            return None
        return raw

    def shape(self) -> JsonSchema:
        """``string`` with ``minLength``, ``maxLength`` and the pattern."""
        schema: JsonSchema = {"type": "string"}
        if self.max_chars is not None:
            schema["maxLength"] = self.max_chars
        if self.min_chars:
            schema["minLength"] = self.min_chars
        if self.pattern is not None:
            schema["pattern"] = self.pattern
        return schema


@dataclass(frozen=True)
class Choice(Field):
    """One of a fixed set of strings."""

    values: tuple[str, ...]
    default: str | None = None
    description: str = ""

    def check(self, raw: Any) -> str | None:
        """The string when it is one of the values, else None."""
        return raw if isinstance(raw, str) and raw in self.values else None

    def shape(self) -> JsonSchema:
        """``string`` with ``enum`` (``const`` for a single value)."""
        if len(self.values) == 1:
            return {"type": "string", "const": self.values[0]}
        return {"type": "string", "enum": list(self.values)}


@dataclass(frozen=True)
class IntegerPair(Field):
    """``[a, b]``: two integers, each in [low, high]."""

    low: int
    high: int
    description: str = ""

    def check(self, raw: Any) -> tuple[int, int] | None:
        """The pair as a tuple, or None."""
        if isinstance(raw, list) and len(raw) == 2 and all(is_integer(v) and self.low <= v <= self.high for v in raw):
            return int(raw[0]), int(raw[1])
        return None

    def shape(self) -> JsonSchema:
        """An array of exactly two bounded integers."""
        item = {"type": "integer", "minimum": self.low, "maximum": self.high}
        return {"type": "array", "prefixItems": [item, item], "items": False, "minItems": 2, "maxItems": 2}


@dataclass(frozen=True)
class Either(Field):
    """The first of ``options`` that accepts the value (``null`` too when ``nullable``)."""

    options: tuple[Field, ...]
    nullable: bool = False
    default: Any = None
    description: str = ""

    def check(self, raw: Any) -> Any:
        """The value as the first accepting option parses it, or None."""
        for option in self.options:
            value = option.check(raw)
            if value is not None:
                return value
        return None

    def shape(self) -> JsonSchema:
        """``anyOf`` the options (and ``null``)."""
        options = [option.schema() for option in self.options] + ([{"type": "null"}] if self.nullable else [])
        return {"anyOf": options}


@dataclass(frozen=True)
class ListOf(Field):
    """An array of ``min_items`` to ``max_items`` (None: any number of) values of ``item``."""

    item: Field
    min_items: int = 0
    max_items: int | None = None
    description: str = ""

    def check(self, raw: Any) -> tuple[Any, ...] | None:
        """The parsed items, or None when the length or any item is refused."""
        if not isinstance(raw, list) or not self.allows(len(raw)):
            return None
        items = tuple(self.item.check(value) for value in raw)
        return None if any(value is None for value in items) else items

    def allows(self, count: int) -> bool:
        """Whether an array of ``count`` items has a length this field accepts."""
        return count >= self.min_items and (self.max_items is None or count <= self.max_items)

    def shape(self) -> JsonSchema:
        """``array`` with ``items``, ``minItems`` and ``maxItems``."""
        schema: JsonSchema = {"type": "array", "items": self.item.schema()}
        if self.min_items:
            schema["minItems"] = self.min_items
        if self.max_items is not None:
            schema["maxItems"] = self.max_items
        return schema


@dataclass(frozen=True)
class MapOf(Field):
    """An object of at most ``max_items`` (None: any number of) entries: ``key`` names, ``value`` values."""

    key: Text
    value: Field
    max_items: int | None = None
    description: str = ""

    def check(self, raw: Any) -> dict[str, Any] | None:
        """The parsed mapping, or None when the size, a name or a value is refused."""
        if not isinstance(raw, dict) or (self.max_items is not None and len(raw) > self.max_items):
            return None
        parsed = {name: self.value.check(value) for name, value in raw.items() if self.key.check(name) is not None}
        return parsed if len(parsed) == len(raw) and None not in parsed.values() else None

    def shape(self) -> JsonSchema:
        """``object`` with ``propertyNames``, ``additionalProperties`` and ``maxProperties``."""
        schema: JsonSchema = {"type": "object", "propertyNames": self.key.shape(),
                              "additionalProperties": self.value.schema()}
        if self.max_items is not None:
            schema["maxProperties"] = self.max_items
        return schema


@dataclass(frozen=True)
class Shape(Field):
    """A JSON object of named fields; ``required`` names the ones it must have (others take their default).

    Keys it does not name are allowed (and ignored) unless ``closed``.
    """

    fields: Mapping[str, Field]
    required: Sequence[str] = ()
    description: str = ""
    closed: bool = False
    title: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)  # more JSON Schema keywords (e.g. examples)

    def check(self, raw: Any) -> dict[str, Any] | None:
        """The fields' parsed values (defaults for the missing optional ones), or None."""
        if not isinstance(raw, dict) or any(name not in raw for name in self.required):
            return None
        if self.closed and set(raw) - set(self.fields):
            return None
        parsed = {name: spec.check(raw[name]) if name in raw else spec.default for name, spec in self.fields.items()}
        refused = [name for name in raw if name in self.fields and parsed[name] is None
                   and not (raw[name] is None and getattr(self.fields[name], "nullable", False))]
        return None if refused else parsed

    def shape(self) -> JsonSchema:
        """``object`` with ``properties`` and ``required``."""
        properties = {name: spec.schema() for name, spec in self.fields.items()}
        schema: JsonSchema = {"type": "object", "properties": properties}
        if self.title:
            schema["title"] = self.title
        if self.required:
            schema["required"] = list(self.required)
        if self.closed:
            schema["additionalProperties"] = False
        schema.update(self.extra)
        return schema


@dataclass(frozen=True)
class Described(Field):
    """A value described only by a JSON Schema (response parts whose shape another module owns, e.g. stats)."""

    json_schema: Mapping[str, Any]
    description: str = ""

    def check(self, raw: Any) -> Any:
        """Never used to parse: responses are only described."""
        raise NotImplementedError("a described field only documents a response")

    def shape(self) -> JsonSchema:
        """The schema as given."""
        return dict(self.json_schema)


def nullable(spec: Field) -> Field:
    """``spec`` or ``null`` (for response fields that may be null)."""
    return Either((spec,), nullable=True, description=spec.description)
