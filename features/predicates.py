"""Declarative filters for aggregations: ``where=Eq("action", "CLICK")``.

A filter is data, not a lambda, because it must mean the same thing in two languages:
Python (the streaming engine) and ClickHouse SQL (the backfill). Each compiles to a
Python expression and to a SQL expression that is never NULL. A comparison with a null
(or missing) field is false: ``Ne("campaign", "men")`` does not match an event without a
campaign, and ``Not(Eq("campaign", "men"))``, being the negation of false, does.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from headwater.errors import ConfigError

__all__ = [
    "And",
    "Eq",
    "FieldType",
    "Ge",
    "Gt",
    "In",
    "IsNull",
    "Le",
    "Lt",
    "Ne",
    "Not",
    "NotNull",
    "Or",
    "Predicate",
    "sql_identifier",
    "sql_literal",
]

Kind = Literal["string", "enum", "int", "float", "bool", "complex"]
Scalar = str | int | float | bool
Record = Mapping[str, Any]


@dataclass(frozen=True)
class FieldType:
    """What a declaration needs to know about one field of a source event schema."""

    name: str
    kind: Kind
    nullable: bool = False
    symbols: tuple[str, ...] = ()  # enum symbols

    @property
    def numeric(self) -> bool:
        return self.kind in ("int", "float")

    def describe(self) -> str:
        base = f"enum {{{', '.join(self.symbols)}}}" if self.kind == "enum" else self.kind
        return f"nullable {base}" if self.nullable else base


def sql_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def sql_literal(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _slug(value: object) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(value).lower()).strip("_") or "x"


def _check_value(pred: str, ft: FieldType, value: object, ordered: bool) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{pred}: {value!r} is not a finite number")
    if ft.kind == "complex":
        raise ConfigError(f"{pred}: field {ft.name} is a {ft.describe()} and cannot be filtered on")
    if ft.kind == "enum":
        if ordered:
            raise ConfigError(f"{pred}: enum field {ft.name} supports Eq, Ne and In only")
        if value not in ft.symbols:
            raise ConfigError(
                f"{pred}: {value!r} is not a symbol of {ft.name}; symbols: {', '.join(ft.symbols)}"
            )
        return
    if ft.kind == "bool" and ordered:
        raise ConfigError(f"{pred}: boolean field {ft.name} supports Eq, Ne and In only")
    ok = {
        "string": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
    }[ft.kind]
    if not ok:
        raise ConfigError(f"{pred}: {value!r} does not match field {ft.name}, which is {ft.describe()}")


def _field(fields: Mapping[str, FieldType], name: str, pred: str) -> FieldType:
    if name not in fields:
        raise ConfigError(f"{pred}: {name!r} is not a field of the source event; fields: {', '.join(fields)}")
    return fields[name]


class Predicate(ABC):
    """A boolean condition on one source event, compilable to Python and to ClickHouse SQL."""

    @abstractmethod
    def fields(self) -> frozenset[str]: ...

    @abstractmethod
    def check(self, fields: Mapping[str, FieldType]) -> None:
        """Raise :class:`ConfigError` if a field is unknown or a value does not fit its type."""

    @abstractmethod
    def python(self, record: str) -> str:
        """A Python expression over the event dict named ``record``; compiled once, not per event."""

    def to_python(self) -> Callable[[Record], bool]:
        test: Callable[[Record], bool] = eval(f"lambda r: bool({self.python('r')})", {})
        return test

    @abstractmethod
    def to_sql(self) -> str:
        """A ClickHouse expression that is 1 where :meth:`to_python` is true and 0 elsewhere (never NULL)."""

    @abstractmethod
    def slug(self) -> str:
        """A name fragment for derived feature names, e.g. ``action_eq_click``."""


@dataclass(frozen=True)
class _Compare(Predicate):
    field: str
    value: Scalar
    op: ClassVar[str]
    sql_op: ClassVar[str]
    ordered: ClassVar[bool] = True

    def fields(self) -> frozenset[str]:
        return frozenset({self.field})

    def check(self, fields: Mapping[str, FieldType]) -> None:
        _check_value(repr(self), _field(fields, self.field, repr(self)), self.value, self.ordered)

    def python(self, record: str) -> str:
        # repr() makes the field name and the (type-checked) value Python literals.
        if self.op == "eq":
            return f"({record}.get({self.field!r}) == {self.value!r})"
        return f"((_x := {record}.get({self.field!r})) is not None and _x {_PY_OPS[self.op]} {self.value!r})"

    def to_sql(self) -> str:
        return f"ifNull({sql_identifier(self.field)} {self.sql_op} {sql_literal(self.value)}, 0)"

    def slug(self) -> str:
        return f"{_slug(self.field)}_{self.op}_{_slug(self.value)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.field!r}, {self.value!r})"


_PY_OPS = {"ne": "!=", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}


class Eq(_Compare):
    op, sql_op, ordered = "eq", "=", False


class Ne(_Compare):
    op, sql_op, ordered = "ne", "!=", False


class Gt(_Compare):
    op, sql_op = "gt", ">"


class Ge(_Compare):
    op, sql_op = "ge", ">="


class Lt(_Compare):
    op, sql_op = "lt", "<"


class Le(_Compare):
    op, sql_op = "le", "<="


@dataclass(frozen=True, init=False)
class In(Predicate):
    field: str
    values: tuple[Scalar, ...]

    def __init__(self, field: str, values: Iterable[Scalar]) -> None:
        object.__setattr__(self, "field", field)
        object.__setattr__(self, "values", tuple(values))

    def fields(self) -> frozenset[str]:
        return frozenset({self.field})

    def check(self, fields: Mapping[str, FieldType]) -> None:
        ft = _field(fields, self.field, repr(self))
        if not self.values:
            raise ConfigError(f"{self!r}: give at least one value")
        for value in self.values:
            _check_value(repr(self), ft, value, ordered=False)

    def python(self, record: str) -> str:
        return f"((_x := {record}.get({self.field!r})) is not None and _x in {self.values!r})"

    def to_sql(self) -> str:
        listed = ", ".join(sql_literal(v) for v in self.values)
        return f"ifNull({sql_identifier(self.field)} IN ({listed}), 0)"

    def slug(self) -> str:
        return f"{_slug(self.field)}_in_{'_'.join(_slug(v) for v in self.values)}"

    def __repr__(self) -> str:
        return f"In({self.field!r}, {list(self.values)!r})"


@dataclass(frozen=True)
class IsNull(Predicate):
    field: str

    def fields(self) -> frozenset[str]:
        return frozenset({self.field})

    def check(self, fields: Mapping[str, FieldType]) -> None:
        _field(fields, self.field, repr(self))

    def python(self, record: str) -> str:
        return f"({record}.get({self.field!r}) is None)"

    def to_sql(self) -> str:
        return f"isNull({sql_identifier(self.field)})"

    def slug(self) -> str:
        return f"{_slug(self.field)}_is_null"


@dataclass(frozen=True)
class NotNull(IsNull):
    def python(self, record: str) -> str:
        return f"({record}.get({self.field!r}) is not None)"

    def to_sql(self) -> str:
        return f"isNotNull({sql_identifier(self.field)})"

    def slug(self) -> str:
        return f"{_slug(self.field)}_not_null"


@dataclass(frozen=True, init=False)
class _Combine(Predicate):
    parts: tuple[Predicate, ...]
    word: ClassVar[str]

    def __init__(self, *parts: Predicate) -> None:
        if len(parts) < 2 or not all(isinstance(p, Predicate) for p in parts):
            raise ConfigError(f"{type(self).__name__} takes two or more predicates, got {parts!r}")
        object.__setattr__(self, "parts", parts)

    def fields(self) -> frozenset[str]:
        return frozenset().union(*(p.fields() for p in self.parts))

    def check(self, fields: Mapping[str, FieldType]) -> None:
        for part in self.parts:
            part.check(fields)

    def to_sql(self) -> str:
        return "(" + f" {self.word.upper()} ".join(p.to_sql() for p in self.parts) + ")"

    def slug(self) -> str:
        return f"_{self.word}_".join(p.slug() for p in self.parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(p) for p in self.parts)})"


class And(_Combine):
    word = "and"

    def python(self, record: str) -> str:
        return "(" + " and ".join(p.python(record) for p in self.parts) + ")"


class Or(_Combine):
    word = "or"

    def python(self, record: str) -> str:
        return "(" + " or ".join(p.python(record) for p in self.parts) + ")"


@dataclass(frozen=True)
class Not(Predicate):
    part: Predicate

    def fields(self) -> frozenset[str]:
        return self.part.fields()

    def check(self, fields: Mapping[str, FieldType]) -> None:
        self.part.check(fields)

    def python(self, record: str) -> str:
        return f"(not {self.part.python(record)})"

    def to_sql(self) -> str:
        return f"(NOT {self.part.to_sql()})"

    def slug(self) -> str:
        return f"not_{self.part.slug()}"
