"""Feature sets: windowed aggregations of one source topic, keyed by one entity field.

Declared once in Python, in the style of Feast and Chronon::

    user_activity = FeatureSet(
        "user_activity",
        entity="user_id",
        source="clicks",
        owner="growth@example.com",
        description="What each user saw and clicked recently.",
        features=[
            Count(windows=["1h", "24h"], where=Eq("action", "IMPRESSION"), name="impressions"),
            Count(windows=["1h", "24h"], where=Eq("action", "CLICK"), name="clicks"),
        ],
    )

Each aggregation yields one feature per window, named ``<name>_<window>`` (``clicks_1h``);
without a name, the name is derived from the aggregation, e.g. ``count_where_action_eq_click``
or ``sum_position``. Window semantics are in :mod:`features.windows`.

Every declaration is checked when it is made, against the source event's schema in the
schema catalog: an unknown topic, field, aggregation or window fails at once with
:class:`~headwater.errors.ConfigError`, naming the problem and listing what is known.

Aggregations ignore events that do not match ``where`` and, for a field, events where the
field is null. Empty windows give 0 for Count, Sum and ApproxDistinct, and null for Mean,
Min, Max, Last and Ratio.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from features.predicates import FieldType, Kind, Predicate
from features.windows import parse_duration
from headwater.errors import ConfigError, NotFoundError
from headwater.settings import PROJECT_ROOT
from streams.catalog import SchemaCatalog
from streams.topics import TOPICS

__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "ApproxDistinct",
    "Count",
    "Feature",
    "FeatureSet",
    "Last",
    "Max",
    "Mean",
    "Measure",
    "Min",
    "Ratio",
    "Sum",
    "aggregation",
    "default_catalog",
    "feature_set_by_layout",
    "source_fields",
]

DType = Literal["long", "double", "string", "boolean"]
MeasureKind = Literal["count", "sum", "min", "max", "last", "distinct"]
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@functools.cache
def default_catalog() -> SchemaCatalog:
    """The schema catalog shipped with the project (``schemas/avro``)."""
    return SchemaCatalog.load(PROJECT_ROOT / "schemas" / "avro")


def _avro_kind(avro_type: Any, named: dict[str, FieldType], name: str) -> FieldType:
    if isinstance(avro_type, list):
        branches = [b for b in avro_type if b != "null"]
        if len(branches) == 1:
            inner = _avro_kind(branches[0], named, name)
            return FieldType(name, inner.kind, True, inner.symbols)
        return FieldType(name, "complex", "null" in avro_type)
    if isinstance(avro_type, dict):
        if avro_type.get("type") == "enum":
            ft = FieldType(name, "enum", False, tuple(avro_type["symbols"]))
            named[avro_type["name"]] = ft
            named[f"{avro_type.get('namespace', '')}.{avro_type['name']}"] = ft
            return ft
        if avro_type.get("type") in ("record", "map", "array", "fixed"):
            return FieldType(name, "complex")
        return _avro_kind(avro_type.get("type"), named, name)
    primitive: dict[str, Kind] = {
        "string": "string",
        "int": "int",
        "long": "int",
        "float": "float",
        "double": "float",
        "boolean": "bool",
    }
    if avro_type in primitive:
        return FieldType(name, primitive[avro_type])
    if avro_type in named:
        return FieldType(name, named[avro_type].kind, False, named[avro_type].symbols)
    return FieldType(name, "complex")


def source_fields(source: str, catalog: SchemaCatalog | None = None) -> tuple[str, dict[str, FieldType]]:
    """Event type and field types (latest schema version) of a logical source topic."""
    topics = {t.logical: t.event_type for t in TOPICS}
    if source not in topics:
        raise ConfigError(f"unknown source topic {source!r}; known topics: {', '.join(topics)}")
    event_type = topics[source]
    raw = (catalog or default_catalog()).latest(event_type).raw
    named: dict[str, FieldType] = {}
    return event_type, {f["name"]: _avro_kind(f["type"], named, f["name"]) for f in raw["fields"]}


@dataclass(frozen=True)
class Measure:
    """One partial aggregate an engine keeps per tile; features are computed from one or two.

    ``count`` with a field counts events where the field is not null (Mean's denominator).
    """

    kind: MeasureKind
    field: str | None = None
    where: Predicate | None = None


@dataclass(frozen=True, init=False)
class Aggregation:
    """Base of the windowed aggregations. Subclasses set ``kind`` and the field rules."""

    field: str | None
    windows: tuple[str, ...]
    where: Predicate | None
    name: str | None

    kind: ClassVar[str]
    needs_field: ClassVar[bool] = True
    numeric_only: ClassVar[bool] = False
    allowed_kinds: ClassVar[tuple[str, ...]] = ("int", "float")

    def __init__(
        self,
        field: str | None = None,
        *,
        windows: Sequence[str] = (),
        where: Predicate | None = None,
        name: str | None = None,
    ) -> None:
        object.__setattr__(self, "field", field)
        object.__setattr__(self, "windows", (windows,) if isinstance(windows, str) else tuple(windows))
        object.__setattr__(self, "where", where)
        object.__setattr__(self, "name", name)

    def base_name(self) -> str:
        if self.name is not None:
            return self.name
        parts = [self.kind] + ([self.field] if self.field else [])
        if self.where is not None:
            parts.append(f"where_{self.where.slug()}")
        return "_".join(parts)

    def measures(self) -> tuple[Measure, ...]:
        return (Measure(_MEASURE_OF[self.kind], self.field, self.where),)

    def dtype(self, fields: Mapping[str, FieldType]) -> DType:
        ft = fields[self.field] if self.field else None
        if self.kind in ("count", "approx_distinct"):
            return "long"
        if self.kind == "mean" or ft is None:
            return "double"
        return _DTYPE_OF_KIND.get(ft.kind, "string")  # strings and enums

    def check(self, fields: Mapping[str, FieldType], context: str) -> None:
        label = f"{context}: {self!r}"
        if self.needs_field:
            if not isinstance(self.field, str):
                raise ConfigError(f"{label}: give the field to aggregate")
            if self.field not in fields:
                raise ConfigError(
                    f"{label}: {self.field!r} is not a field of the source event; fields: {', '.join(fields)}"
                )
            ft = fields[self.field]
            if ft.kind not in self.allowed_kinds:
                fitting = [f for f, t in fields.items() if t.kind in self.allowed_kinds]
                raise ConfigError(
                    f"{label}: field {self.field} is {ft.describe()}; {type(self).__name__} needs "
                    f"{' or '.join(self.allowed_kinds)} fields: {', '.join(fitting) or 'none in this event'}"
                )
        elif self.field is not None:
            raise ConfigError(f"{label}: {type(self).__name__} takes no field")
        if self.where is not None:
            if not isinstance(self.where, Predicate):
                raise ConfigError(f"{label}: where= takes a predicate such as Eq('action', 'CLICK')")
            self.where.check(fields)

    def __repr__(self) -> str:
        args = [repr(self.field)] if self.field else []
        args.append(f"windows={list(self.windows)!r}")
        if self.where is not None:
            args.append(f"where={self.where!r}")
        if self.name is not None:
            args.append(f"name={self.name!r}")
        return f"{type(self).__name__}({', '.join(args)})"


_DTYPE_OF_KIND: dict[str, DType] = {"int": "long", "float": "double", "bool": "boolean"}
_MEASURE_OF: dict[str, MeasureKind] = {
    "count": "count",
    "sum": "sum",
    "min": "min",
    "max": "max",
    "last": "last",
    "approx_distinct": "distinct",
}


class Count(Aggregation):
    """Number of events (matching ``where``) in the window."""

    kind = "count"
    needs_field = False

    def __init__(
        self, *, windows: Sequence[str] = (), where: Predicate | None = None, name: str | None = None
    ) -> None:
        super().__init__(None, windows=windows, where=where, name=name)


class Sum(Aggregation):
    """Sum of a numeric field; an integer field sums exactly to an integer."""

    kind = "sum"


class Mean(Aggregation):
    """Mean of a numeric field: its sum over the number of events where it is not null."""

    kind = "mean"

    def measures(self) -> tuple[Measure, ...]:
        return (Measure("sum", self.field, self.where), Measure("count", self.field, self.where))


class Min(Aggregation):
    kind = "min"


class Max(Aggregation):
    kind = "max"


class Last(Aggregation):
    """Latest non-null value of a field; ties in event time go to the larger source event id."""

    kind = "last"
    allowed_kinds = ("int", "float", "string", "enum", "bool")


class ApproxDistinct(Aggregation):
    """Approximate number of distinct values (linear counting, see :mod:`features.windows`)."""

    kind = "approx_distinct"
    allowed_kinds = ("int", "string", "enum")


@dataclass(frozen=True, init=False, repr=False)
class Ratio(Aggregation):
    """``numerator / denominator`` of two Count or Sum aggregations over the same window, e.g. a CTR.

    The parts take no windows or names of their own; the ratio is null when the denominator is 0.
    """

    numerator: Aggregation
    denominator: Aggregation

    kind = "ratio"
    needs_field = False

    def __init__(
        self,
        numerator: Aggregation,
        denominator: Aggregation,
        *,
        windows: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        super().__init__(None, windows=windows, where=None, name=name)
        object.__setattr__(self, "numerator", numerator)
        object.__setattr__(self, "denominator", denominator)

    def base_name(self) -> str:
        if self.name is not None:
            return self.name
        return f"ratio_{self.numerator.base_name()}_over_{self.denominator.base_name()}"

    def measures(self) -> tuple[Measure, ...]:
        return self.numerator.measures() + self.denominator.measures()

    def dtype(self, fields: Mapping[str, FieldType]) -> DType:
        return "double"

    def check(self, fields: Mapping[str, FieldType], context: str) -> None:
        for part in (self.numerator, self.denominator):
            if not isinstance(part, Count | Sum):
                raise ConfigError(
                    f"{context}: {self!r}: numerator and denominator are Count or Sum, got {part!r}"
                )
            if part.windows or part.name:
                raise ConfigError(f"{context}: {self!r}: give windows and name to the Ratio, not its parts")
            part.check(fields, context)

    def __repr__(self) -> str:
        extra = f", name={self.name!r}" if self.name else ""
        return f"Ratio({self.numerator!r}, {self.denominator!r}, windows={list(self.windows)!r}{extra})"


# Every feature set built in this process, by layout id (see FeatureSet._layout_id): readers of
# tiles find the definition that wrote them here. A process knows the feature sets it loaded
# (the repository of its settings); the first definition of an id wins.
_BY_LAYOUT: dict[int, FeatureSet] = {}


def feature_set_by_layout(layout_id: int) -> FeatureSet:
    """The feature set whose tiles carry ``layout_id``; NotFoundError if this process has not loaded it."""
    fs = _BY_LAYOUT.get(layout_id)
    if fs is None:
        raise NotFoundError(
            f"feature tiles of layout {layout_id:x} were written by a feature set definition this process "
            "has not loaded: load the repository that defines it (settings.feature_repository), "
            f"known: {', '.join(sorted(f'{f.name} v{f.version}' for f in _BY_LAYOUT.values())) or 'none'}"
        )
    return fs


AGGREGATIONS: dict[str, type[Aggregation]] = {
    cls.__name__: cls for cls in (Count, Sum, Mean, Min, Max, Last, ApproxDistinct, Ratio)
}


def aggregation(kind: str, *args: Any, **kwargs: Any) -> Aggregation:
    """Build an aggregation by class name (for definitions read from configuration)."""
    cls = AGGREGATIONS.get(kind)
    if cls is None:
        raise ConfigError(f"unknown aggregation {kind!r}; known: {', '.join(AGGREGATIONS)}")
    return cls(*args, **kwargs)


@dataclass(frozen=True)
class Feature:
    """One output value: an aggregation over one window."""

    name: str
    aggregation: Aggregation
    window: str
    window_ms: int
    dtype: DType

    @property
    def kind(self) -> str:
        return self.aggregation.kind

    @property
    def measures(self) -> tuple[Measure, ...]:
        return self.aggregation.measures()


class FeatureSet:
    """Features of one entity computed from one source topic, validated at declaration."""

    def __init__(
        self,
        name: str,
        *,
        entity: str,
        source: str,
        features: Iterable[Aggregation],
        owner: str,
        description: str,
        ttl: str | None = None,
        lateness: str = "1m",
        version: int = 1,
        catalog: SchemaCatalog | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"feature set name {name!r}: use lower case letters, digits and _")
        where = f"feature set {name!r}"
        if not owner or not description:
            raise ConfigError(f"{where}: give an owner and a description, so people know whom to ask")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError(f"{where}: version must be a positive integer, got {version!r}")
        self.name, self.owner, self.description, self.version = name, owner, description, version
        self.source, self.entity = source, entity
        try:
            self.event_type, self.fields = source_fields(source, catalog)
        except (ConfigError, NotFoundError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        for required in ("event_id", "event_time"):
            if required not in self.fields:
                raise ConfigError(f"{where}: {self.event_type} events have no {required} field to window on")
        if entity not in self.fields:
            raise ConfigError(
                f"{where}: entity {entity!r} is not a field of {self.event_type} events "
                f"(topic {source}); fields: {', '.join(self.fields)}"
            )
        if self.fields[entity].kind not in ("string", "int", "enum"):
            raise ConfigError(
                f"{where}: entity field {entity} is {self.fields[entity].describe()}; use a key"
            )
        self.lateness_ms = parse_duration(lateness, f"{where}: lateness")
        self.aggregations = tuple(features)
        self.features = self._resolve(where)
        self.ttl_ms = parse_duration(ttl, f"{where}: ttl") if ttl is not None else self.max_window_ms
        self.layout_id = self._layout_id()
        _BY_LAYOUT.setdefault(self.layout_id, self)

    def _layout_id(self) -> int:
        """A 63-bit fingerprint of everything that gives a feature update's tiles their meaning.

        Tiles (see :mod:`features.engine`) are partial aggregates laid out by this definition's
        windows and measures; a reader that evaluates them at read time must use the definition
        that wrote them, which it finds by this id (:func:`feature_set_by_layout`).
        """
        parts = [self.name, str(self.version), self.entity, self.source]
        for f in self.features:
            measures = ";".join(f"{m.kind},{m.field},{m.where!r}" for m in f.measures)
            parts.append(f"{f.name}|{f.kind}|{f.window_ms}|{measures}")
        digest = hashlib.blake2b("\n".join(parts).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") >> 1

    def _resolve(self, where: str) -> tuple[Feature, ...]:
        if not self.aggregations:
            raise ConfigError(f"{where}: declare at least one feature")
        features: dict[str, Feature] = {}
        for i, agg in enumerate(self.aggregations):
            if not isinstance(agg, Aggregation):
                raise ConfigError(
                    f"{where}: features[{i}] is {agg!r}, not an aggregation; known: {', '.join(AGGREGATIONS)}"
                )
            agg.check(self.fields, where)
            if not agg.windows:
                raise ConfigError(f"{where}: {agg!r}: give windows=[...], e.g. ['1h', '24h']")
            lengths: dict[int, str] = {}
            for window in agg.windows:
                ms = parse_duration(window, f"{where}: {agg!r}: window")
                if ms in lengths:
                    raise ConfigError(
                        f"{where}: {agg!r}: windows {lengths[ms]!r} and {window!r} are the same"
                    )
                lengths[ms] = window
                feature = Feature(f"{agg.base_name()}_{window}", agg, window, ms, agg.dtype(self.fields))
                if not _NAME_RE.match(feature.name):
                    raise ConfigError(
                        f"{where}: feature name {feature.name!r}: use lower case letters, digits, _"
                    )
                if feature.name in features:
                    raise ConfigError(f"{where}: two features are named {feature.name!r}; pass name=")
                features[feature.name] = feature
        return tuple(features.values())

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def max_window_ms(self) -> int:
        return max(f.window_ms for f in self.features)

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise NotFoundError(
            f"feature set {self.name!r} has no feature {name!r}; known: {', '.join(self.feature_names)}"
        )

    def __repr__(self) -> str:
        return f"FeatureSet({self.name!r}, entity={self.entity!r}, source={self.source!r}, v{self.version})"
