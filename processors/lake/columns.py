"""How an Avro event becomes a row of lake columns, and back (pure, no I/O).

Every top-level field of the event's (latest) Avro schema becomes one Parquet column, typed
so that ClickHouse reads it naturally:

=================================  ==================================  ============================
Avro                               Arrow / Parquet                     ClickHouse
=================================  ==================================  ============================
string, enum                       string                              String
bytes, fixed                       binary                              String
int / long                         int32 / int64                       Int32 / Int64
float / double                     float32 / float64                   Float32 / Float64
boolean                            bool                                Bool
["null", T]                        nullable T                          Nullable(T) (scalars)
array<T>                           list<T>                             Array(T)
map<T>                             map<string, T>                      Map(String, T)
record (nested)                    struct                              Tuple(name T, ...)
union of several scalar types      string holding the JSON value       String (JSONExtract*)
=================================  ==================================  ============================

A **map whose values are a union of several scalar types** -- ``feature_update.values`` --
becomes two columns, chosen so SQL stays pleasant and nothing is lost:

* ``values``: ``Map(String, Nullable(Float64))``, every key with its numeric value
  (booleans as 0/1, longs as doubles, strings and nulls as NULL): ``values['clicks_1h']``.
* ``values_json``: the exact map as JSON (``JSONExtractString(values_json, 'last_item')``);
  the lake reader rebuilds the original record from it, so a replay is exact.

Feature updates also get one typed column per ``<feature_set>:<feature>`` present in the
file (:func:`feature_value_columns`), named exactly like the feature reference:
``Nullable(Float64)`` for numbers and booleans, ``Nullable(String)`` for strings. Point-in-time
retrieval reads those: a map must be searched key by key in every row (measured 15x slower
than plain columns for 50 features), a column is read at memory speed.

Lake metadata columns (:data:`META_COLUMNS`) follow the event's own fields.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from headwater.errors import ConfigError

__all__ = [
    "META_COLUMNS",
    "Column",
    "EventColumns",
    "event_columns",
    "feature_value_columns",
]

Encode = Callable[[Any], Any]
Decode = Callable[[Any], Any]

_SCALARS: dict[str, tuple[pa.DataType, str]] = {
    "string": (pa.string(), "String"),
    "bytes": (pa.binary(), "String"),
    "int": (pa.int32(), "Int32"),
    "long": (pa.int64(), "Int64"),
    "float": (pa.float32(), "Float32"),
    "double": (pa.float64(), "Float64"),
    "boolean": (pa.bool_(), "Bool"),
}
_JSON_SCALARS = {"null", "boolean", "int", "long", "float", "double", "string"}


@dataclass(frozen=True)
class Column:
    """One lake column: its Arrow type (what the writer writes) and ClickHouse type (what views declare)."""

    name: str
    arrow: pa.DataType
    nullable: bool
    clickhouse: str

    def field(self) -> pa.Field:
        return pa.field(self.name, self.arrow, nullable=self.nullable)


META_COLUMNS: tuple[Column, ...] = (
    Column("_topic", pa.string(), False, "String"),
    Column("_partition", pa.int32(), False, "Int32"),
    Column("_offset", pa.int64(), False, "Int64"),
    Column("_key", pa.string(), True, "Nullable(String)"),
    Column("_event_type", pa.string(), False, "String"),
    Column("_ingest_time", pa.int64(), False, "Int64"),
)


@dataclass(frozen=True)
class _Codec:
    arrow: pa.DataType
    clickhouse: str  # without Nullable()
    nullable: bool
    encode: Encode  # Avro-decoded Python value -> what pyarrow accepts
    decode: Decode  # pyarrow's to_pylist() value -> Avro-shaped Python value


def _identity(v: Any) -> Any:
    return v


def _json_dumps(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def _numeric(v: Any) -> float | None:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, int | float):
        return float(v)
    return None


class _Names:
    """Named Avro types (records, enums, fixed) seen so far, for references by name."""

    def __init__(self) -> None:
        self.types: dict[str, Any] = {}

    def register(self, t: dict[str, Any], namespace: str | None) -> str | None:
        name = t.get("name")
        if not name:
            return namespace
        ns = t.get("namespace", namespace)
        full = name if "." in name or not ns else f"{ns}.{name}"
        self.types[full] = t
        self.types.setdefault(name.rsplit(".", 1)[-1], t)
        return full.rsplit(".", 1)[0] if "." in full else ns

    def resolve(self, t: Any) -> Any:
        if isinstance(t, str) and t not in _SCALARS and t != "null":
            found = self.types.get(t) or self.types.get(t.rsplit(".", 1)[-1])
            if found is None:
                raise ConfigError(f"Avro type {t!r} is referenced before it is defined")
            return found
        return t


def _branch_name(t: Any) -> str:
    if isinstance(t, str):
        return t
    if isinstance(t, dict):
        return str(t.get("type"))
    return "union"


def _codec(t: Any, names: _Names, namespace: str | None, where: str) -> _Codec:
    t = names.resolve(t)
    if isinstance(t, list):
        branches = [names.resolve(b) for b in t]
        non_null = [b for b in branches if b != "null"]
        if len(non_null) == 1:
            inner = _codec(non_null[0], names, namespace, where)
            return _Codec(inner.arrow, inner.clickhouse, True, inner.encode, inner.decode)
        if all(_branch_name(b) in _JSON_SCALARS for b in non_null):
            # Several scalar types: the exact value as JSON (json keeps bool/int/float/str apart).
            return _Codec(
                pa.string(),
                "String",
                "null" in branches,
                lambda v: None if v is None else _json_dumps(v),
                lambda v: None if v is None else json.loads(v),
            )
        raise ConfigError(f"{where}: the lake cannot store a union of {t}; use scalar branches only")
    if isinstance(t, str):
        if t in _SCALARS:
            arrow, ch = _SCALARS[t]
            return _Codec(arrow, ch, False, _identity, _identity)
        raise ConfigError(f"{where}: unsupported Avro type {t!r}")
    kind = t.get("type")
    if kind in _SCALARS:  # {"type": "long", "logicalType": ...}: stored as the underlying type
        return _codec(kind, names, namespace, where)
    if kind == "enum":
        names.register(t, namespace)
        return _Codec(pa.string(), "String", False, _identity, _identity)
    if kind == "fixed":
        names.register(t, namespace)
        return _Codec(pa.binary(), "String", False, _identity, _identity)
    if kind == "array":
        item = _codec(t["items"], names, namespace, f"{where}[]")
        return _Codec(
            pa.list_(pa.field("item", item.arrow, nullable=item.nullable)),
            f"Array({_ch(item)})",
            False,
            lambda v: None if v is None else [item.encode(x) for x in v],
            lambda v: None if v is None else [item.decode(x) for x in v],
        )
    if kind == "map":
        val = _codec(t["values"], names, namespace, f"{where}{{}}")
        return _Codec(
            pa.map_(pa.string(), pa.field("value", val.arrow, nullable=val.nullable)),
            f"Map(String, {_ch(val)})",
            False,
            lambda v: None if v is None else [(k, val.encode(x)) for k, x in v.items()],
            lambda v: None if v is None else {k: val.decode(x) for k, x in v},
        )
    if kind == "record":
        ns = names.register(t, namespace)
        fields = [(f["name"], _codec(f["type"], names, ns, f"{where}.{f['name']}")) for f in t["fields"]]
        return _Codec(
            pa.struct([pa.field(n, c.arrow, nullable=c.nullable) for n, c in fields]),
            "Tuple(" + ", ".join(f"`{n}` {_ch(c)}" for n, c in fields) + ")",
            False,
            lambda v: None if v is None else {n: c.encode(v.get(n)) for n, c in fields},
            lambda v: None if v is None else {n: c.decode(v.get(n)) for n, c in fields},
        )
    raise ConfigError(f"{where}: unsupported Avro type {t!r}")


def _ch(c: _Codec) -> str:
    # ClickHouse has no Nullable(Array/Map/Tuple): a null composite reads as an empty one.
    composite = c.clickhouse.startswith(("Array(", "Map(", "Tuple("))
    return f"Nullable({c.clickhouse})" if c.nullable and not composite else c.clickhouse


def _is_scalar_union_map(t: Any, names: _Names) -> bool:
    t = names.resolve(t)
    if not (isinstance(t, dict) and t.get("type") == "map" and isinstance(t["values"], list)):
        return False
    non_null = [b for b in t["values"] if b != "null"]
    return len(non_null) > 1 and all(_branch_name(names.resolve(b)) in _JSON_SCALARS for b in non_null)


@dataclass(frozen=True)
class _FieldCodec:
    name: str
    columns: tuple[Column, ...]
    encode: Callable[[Any], tuple[Any, ...]]  # field value -> one value per column
    decode: Callable[[Mapping[str, Any]], Any]  # row -> field value


def _field_codec(field: Mapping[str, Any], names: _Names, namespace: str | None, where: str) -> _FieldCodec:
    name = field["name"]
    if _is_scalar_union_map(field["type"], names):
        json_name = f"{name}_json"

        def encode_map(v: Any) -> tuple[Any, ...]:
            v = v or {}
            return [(k, _numeric(x)) for k, x in sorted(v.items())], _json_dumps(v)

        return _FieldCodec(
            name,
            (
                Column(
                    name,
                    pa.map_(pa.string(), pa.field("value", pa.float64(), nullable=True)),
                    False,
                    "Map(String, Nullable(Float64))",
                ),
                Column(json_name, pa.string(), False, "String"),
            ),
            encode_map,
            lambda row: json.loads(row[json_name]) if row.get(json_name) is not None else {},
        )
    codec = _codec(field["type"], names, namespace, where)
    return _FieldCodec(
        name,
        (Column(name, codec.arrow, codec.nullable, _ch(codec)),),
        lambda v: (codec.encode(v),),
        lambda row: codec.decode(row.get(name)),
    )


@dataclass(frozen=True)
class EventColumns:
    """The lake columns of one event type, with the encoders between records and rows."""

    event_type: str
    fields: tuple[_FieldCodec, ...]

    @property
    def columns(self) -> tuple[Column, ...]:
        """Event columns then lake metadata columns, in file order."""
        return tuple(c for f in self.fields for c in f.columns) + META_COLUMNS

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([c.field() for c in self.columns])

    def clickhouse_structure(self) -> str:
        """The ``name Type, ...`` structure a ClickHouse ``file()`` view declares."""
        return ", ".join(f"`{c.name}` {c.clickhouse}" for c in self.columns)

    def to_columns(self, records: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
        """Event columns (not metadata) for ``records``, column-wise, ready for ``pa.array``."""
        out: dict[str, list[Any]] = {c.name: [] for f in self.fields for c in f.columns}
        for f in self.fields:
            lists = [out[c.name] for c in f.columns]
            for record in records:
                for values, value in zip(lists, f.encode(record.get(f.name)), strict=True):
                    values.append(value)
        return out

    def from_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The Avro-shaped record of one lake row (as given by ``Table.to_pylist()``)."""
        return {f.name: f.decode(row) for f in self.fields}


def event_columns(event_type: str, schema: Mapping[str, Any]) -> EventColumns:
    """Lake columns of an event type from its Avro record schema; :class:`ConfigError` if unstorable."""
    if schema.get("type") != "record":
        raise ConfigError(f"{event_type}: an event schema must be an Avro record")
    names = _Names()
    ns = names.register(dict(schema), schema.get("namespace"))
    fields = tuple(_field_codec(f, names, ns, f"{event_type}.{f['name']}") for f in schema["fields"])
    taken = {c.name for f in fields for c in f.columns}
    clash = taken & {c.name for c in META_COLUMNS}
    if clash or len(taken) != sum(len(f.columns) for f in fields):
        raise ConfigError(f"{event_type}: field names clash with lake columns: {sorted(clash) or 'json'}")
    return EventColumns(event_type, fields)


def feature_value_columns(records: Iterable[Mapping[str, Any]]) -> dict[str, pa.Array]:
    """One typed column per ``<feature_set>:<feature>`` in a batch of feature updates.

    Numbers and booleans become Float64 (so a column has one type in every file, whatever
    branch of the union a writer picked); strings stay strings. A feature with both numbers
    and strings in one batch is written as strings. Rows of other feature sets hold NULL.
    """
    rows = list(records)
    cols: dict[str, list[Any]] = {}
    for i, record in enumerate(rows):
        fs = record["feature_set"]
        for feature, value in (record.get("values") or {}).items():
            values = cols.get(f"{fs}:{feature}")
            if values is None:
                values = cols[f"{fs}:{feature}"] = [None] * len(rows)
            values[i] = value
    out: dict[str, pa.Array] = {}
    for name in sorted(cols):
        values = cols[name]
        if all(v is None for v in values):
            # No value says the type: a typed guess (Float64) would clash with the String a
            # later file infers. Left out, union schema inference reads it as NULL here.
            continue
        if any(isinstance(v, str) for v in values):
            out[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
        else:
            out[name] = pa.array([_numeric(v) for v in values], pa.float64())
    return out
