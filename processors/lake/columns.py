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

A **feature update's** ``values`` (a map whose values are a union of scalar types) is stored
once, as typed columns, so SQL and training sets read plain columns and a replay is exact:

* one column per ``<feature_set>:<feature>`` present in the file, named exactly like the
  feature reference and typed by its values: ``Int64`` for longs, ``Float64`` for doubles,
  ``Bool`` for booleans, ``String`` for strings (``Nullable``; NULL in rows of other feature
  sets and where the value is null). A map is searched key by key in every row (measured 15x
  slower than plain columns for 50 features) and its JSON twin cost four times the bytes.
* ``value_keys``: the map's keys as a JSON array (``["clicks_1h","last_item"]``): it tells a
  key whose value is null from an absent key. One per feature set version, so the column is
  dictionary-encoded to almost nothing.
* ``value_exceptions``: ``Map(String, String)``, normally empty: the JSON of each value its
  column cannot hold exactly, when one batch mixes types for a feature (a long among doubles is
  stored as a double and listed here; see :func:`_typed_column`).

A column's type is chosen per file, so one feature may be ``Int64`` in one file and ``Float64``
in another: :func:`unify_types` gives the type every reader declares for it (the offline
store's views, training sets), while :meth:`EventColumns.records` decodes each file with its
own types, exactly. A feature whose values are all null in a file has no column there (no value
says its type); ``value_keys`` still lists it.

Other maps of scalar unions (none today) become ``Map(String, Nullable(String))`` of JSON values.

Lake metadata columns (:data:`META_COLUMNS`) follow the event's own fields.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from headwater.errors import ConfigError

__all__ = [
    "META_COLUMNS",
    "VALUE_EXCEPTIONS",
    "VALUE_KEYS",
    "Column",
    "EventColumns",
    "clickhouse_type",
    "event_columns",
    "feature_column",
    "unify_types",
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


# -- a feature update's values: typed columns ------------------------------------------------------

FEATURE_VALUES = ("feature_update", "values")  # (event type, field) stored as typed columns
FEATURE_SET_FIELD = "feature_set"  # the field that names the columns: <feature_set>:<feature>
VALUE_KEYS = "value_keys"
VALUE_EXCEPTIONS = "value_exceptions"
_EXCEPTIONS_TYPE = pa.map_(pa.string(), pa.field("value", pa.string(), nullable=False))
_LEGACY_JSON = "values_json"  # files written before the typed columns were the only copy

# Column types of a batch's numbers, widest first: a numeric column takes the first that any of
# them has, so every number it holds keeps its value (a long among doubles as a double).
_NUMBERS: tuple[tuple[type, pa.DataType], ...] = (
    (float, pa.float64()),
    (int, pa.int64()),
    (bool, pa.bool_()),
)
_CLICKHOUSE_OF = {pa.float64(): "Float64", pa.int64(): "Int64", pa.bool_(): "Bool", pa.string(): "String"}


def feature_column(feature_set: str, feature: str) -> str:
    """The lake column of a feature: named like its reference."""
    return f"{feature_set}:{feature}"


def unify_types(types: Iterable[pa.DataType]) -> pa.DataType:
    """The one type readers give a feature column that files typed differently.

    Strings win over everything (numbers read as their text), then doubles, then longs (a
    boolean reads as 0/1). Files of older releases held doubles and strings only.
    """
    seen = {t for t in types if not pa.types.is_null(t)}
    if len(seen) == 1:
        return seen.pop()
    for t in (pa.string(), pa.float64(), pa.int64()):
        if t in seen:
            return t
    return pa.string() if not seen else pa.float64()


def clickhouse_type(t: pa.DataType) -> str:
    """The (Nullable) ClickHouse type a view declares for a feature column of Arrow type ``t``."""
    ch = _CLICKHOUSE_OF.get(t)
    if ch is None:
        raise ConfigError(f"a feature column of Arrow type {t} is not one the lake writes")
    return f"Nullable({ch})"


def _python_kind(v: Any) -> type:
    return bool if isinstance(v, bool) else int if isinstance(v, int) else type(v)


def _typed_column(values: list[Any]) -> tuple[pa.Array, dict[int, str]]:
    """One feature's values in a batch as an Arrow array, and the JSON of those it cannot hold.

    Numbers only: the widest numeric type. Strings only: strings. Both (a producer's mistake):
    whichever are more; a string column holds a number as its JSON text, a numeric column holds
    NULL for a string. Values of another type than the column's are listed as exceptions.
    """
    kinds = [_python_kind(v) for v in values if v is not None]
    strings = kinds.count(str)
    kind: type
    arrow: pa.DataType
    if strings * 2 > len(kinds):
        kind, arrow = str, pa.string()
    else:
        kind, arrow = next((k, t) for k, t in _NUMBERS if k in kinds)
    if all(k is kind for k in kinds):
        return pa.array(values, arrow), {}
    exceptions: dict[int, str] = {}
    held: list[Any] = []
    for i, v in enumerate(values):
        if v is None or _python_kind(v) is kind:
            held.append(v)
            continue
        exceptions[i] = _json_dumps(v)
        if kind is str:
            held.append(exceptions[i])
        else:  # a narrower number converts without loss; a string has no number
            held.append(None if isinstance(v, str) else kind(v))
    return pa.array(held, arrow), exceptions


# One key list per feature set version in practice: cached, and bounded whatever producers send.
@functools.lru_cache(maxsize=1024)
def _keys_json(keys: tuple[str, ...]) -> str:
    return json.dumps(list(keys), separators=(",", ":"))


@functools.lru_cache(maxsize=1024)
def _keys_of(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


class _FeatureValues:
    """Encodes and decodes the ``values`` of feature updates (see the module docstring)."""

    columns = (
        Column(VALUE_KEYS, pa.string(), False, "String"),
        Column(VALUE_EXCEPTIONS, _EXCEPTIONS_TYPE, False, "Map(String, String)"),
    )

    def encode(
        self, records: Sequence[Mapping[str, Any]]
    ) -> tuple[dict[str, list[Any]], dict[str, pa.Array]]:
        """(``value_keys`` and ``value_exceptions`` lists, the batch's typed columns by name)."""
        n = len(records)
        keys_col: list[str] = []
        by_column: dict[str, list[Any]] = {}
        for i, record in enumerate(records):
            values: Mapping[str, Any] = record.get("values") or {}
            keys_col.append(_keys_json(tuple(values)))
            fs = record[FEATURE_SET_FIELD]
            for feature, value in values.items():
                if value is None:
                    continue
                name = feature_column(fs, feature)
                column = by_column.get(name)
                if column is None:
                    column = by_column[name] = [None] * n
                column[i] = value
        exceptions: list[list[tuple[str, str]]] = [[] for _ in range(n)]
        typed: dict[str, pa.Array] = {}
        for name in sorted(by_column):
            typed[name], misfits = _typed_column(by_column[name])
            for i, text in misfits.items():
                feature = name[len(records[i][FEATURE_SET_FIELD]) + 1 :]  # the set's name may hold ':'
                exceptions[i].append((feature, text))
        return {VALUE_KEYS: keys_col, VALUE_EXCEPTIONS: exceptions}, typed

    def decode(self, row: Mapping[str, Any]) -> dict[str, Any]:
        text = row.get(VALUE_KEYS)
        if text is None:
            legacy = row.get(_LEGACY_JSON)
            return dict(json.loads(legacy)) if legacy is not None else {}
        fs = row[FEATURE_SET_FIELD]
        exceptions = dict(row.get(VALUE_EXCEPTIONS) or ())
        return {
            k: json.loads(exceptions[k]) if k in exceptions else row.get(feature_column(fs, k))
            for k in _keys_of(text)
        }


# -- every event type ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FieldCodec:
    name: str
    columns: tuple[Column, ...]
    encode: Callable[[Any], tuple[Any, ...]]  # field value -> one value per column
    decode: Callable[[Mapping[str, Any]], Any]  # row -> field value


def _field_codec(field: Mapping[str, Any], names: _Names, namespace: str | None, where: str) -> _FieldCodec:
    name = field["name"]
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
    feature_values: _FeatureValues | None = None  # feature updates: their values as typed columns
    values_at: int = 0  # where the values field is among the schema's fields

    @property
    def columns(self) -> tuple[Column, ...]:
        """The columns every file has: event columns then lake metadata columns, in file order.

        A feature update file also has its typed ``<feature_set>:<feature>`` columns, after these.
        """
        own = [c for f in self.fields for c in f.columns]
        if self.feature_values is not None:
            at = sum(len(f.columns) for f in self.fields[: self.values_at])
            own[at:at] = self.feature_values.columns
        return (*own, *META_COLUMNS)

    @property
    def id_field(self) -> str | None:
        """The field that identifies an event: copies of one event (a retry, a replay) share it."""
        names = {f.name for f in self.fields}
        return next((n for n in ("event_id", "prediction_id") if n in names), None)

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([c.field() for c in self.columns])

    def clickhouse_structure(self) -> str:
        """The ``name Type, ...`` structure a ClickHouse ``file()`` view declares."""
        return ", ".join(f"`{c.name}` {c.clickhouse}" for c in self.columns)

    def to_table(self, records: Sequence[Mapping[str, Any]], meta: Mapping[str, list[Any]]) -> pa.Table:
        """The lake table of ``records`` with the metadata columns ``meta`` (name -> values)."""
        data: dict[str, list[Any]] = {c.name: [] for f in self.fields for c in f.columns}
        for f in self.fields:
            lists = [data[c.name] for c in f.columns]
            for record in records:
                for values, value in zip(lists, f.encode(record.get(f.name)), strict=True):
                    values.append(value)
        typed: dict[str, pa.Array] = {}
        if self.feature_values is not None:
            static, typed = self.feature_values.encode(records)
            data.update(static)
        table = pa.Table.from_pydict({**data, **meta}, schema=self.arrow_schema())
        for name, array in typed.items():
            # REQUIRED when the batch has no null: cheaper to read (readers declare Nullable).
            table = table.append_column(pa.field(name, array.type, nullable=array.null_count > 0), array)
        return table

    def from_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The Avro-shaped record of one lake row (a dict of one file's columns, with its types)."""
        pairs = [(f.name, f.decode(row)) for f in self.fields]
        if self.feature_values is not None:
            pairs.insert(self.values_at, (FEATURE_VALUES[1], self.feature_values.decode(row)))
        return dict(pairs)

    def records(self, table: pa.Table) -> list[dict[str, Any]]:
        """The Avro-shaped records of a table read from one lake file, in its row order.

        Exact: each value comes back as the Avro branch it was written as. Only a row's own
        feature set's columns are converted to Python (a lake holds every set's columns).
        """
        if self.feature_values is None or table.num_rows == 0:
            return [self.from_row(row) for row in table.to_pylist()]
        fixed = [c.name for c in self.columns if c.name in table.column_names]
        if _LEGACY_JSON in table.column_names:
            fixed.append(_LEGACY_JSON)
        sets = table.column(FEATURE_SET_FIELD)
        out: list[dict[str, Any]] = [{} for _ in range(table.num_rows)]
        for fs in pc.unique(sets).to_pylist():
            at = pc.indices_nonzero(pc.equal(sets, fs))
            prefix = feature_column(fs, "")
            wanted = fixed + [n for n in table.column_names if n.startswith(prefix)]
            rows = table.select(wanted).take(at).to_pylist()
            for i, row in zip(at.to_pylist(), rows, strict=True):
                out[i] = self.from_row(row)
        return out


def event_columns(event_type: str, schema: Mapping[str, Any]) -> EventColumns:
    """Lake columns of an event type from its Avro record schema; :class:`ConfigError` if unstorable."""
    if schema.get("type") != "record":
        raise ConfigError(f"{event_type}: an event schema must be an Avro record")
    names = _Names()
    ns = names.register(dict(schema), schema.get("namespace"))
    typed = event_type == FEATURE_VALUES[0]
    field_names = [f["name"] for f in schema["fields"]]
    fields = tuple(
        _field_codec(f, names, ns, f"{event_type}.{f['name']}")
        for f in schema["fields"]
        if not (typed and f["name"] == FEATURE_VALUES[1])
    )
    cols = (
        EventColumns(event_type, fields, _FeatureValues(), field_names.index(FEATURE_VALUES[1]))
        if typed
        else EventColumns(event_type, fields)
    )
    taken = [c.name for c in cols.columns]
    if len(set(taken)) != len(taken):
        clash = sorted({n for n in taken if taken.count(n) > 1})
        raise ConfigError(f"{event_type}: field names clash with lake columns: {clash}")
    return cols
