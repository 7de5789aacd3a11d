"""Compile a feature set to ClickHouse SQL: its values at every source event time (the backfill).

``backfill_sql(feature_set, "clicks", start, end)`` returns one query giving, for every
(entity, event time) of a source event in ``[start, end)``, the values the streaming engine
emits last for that entity and time: columns ``entity_key``, ``event_time``, then one column
per feature. Events up to the largest window before ``start`` count as history. The source
relation is a parameter: the offline store's ``clicks`` view, or ``file('…', Parquet)``.

It mirrors :mod:`features.windows` step by step. For each window:

1. ``tiles``: every event's partial aggregate, grouped by entity and tile
   (``intDiv(event_time, tile)``);
2. ``prev``: the tiles of the window before each tile, combined by a window function over
   the tiles: ``RANGE BETWEEN n - 1 PRECEDING AND 1 PRECEDING`` (the n - 1 whole tiles);
3. ``cur``: the running aggregate of the event's own tile up to and including its event
   time, peers included: ``PARTITION BY entity, tile ORDER BY event_time RANGE BETWEEN
   UNBOUNDED PRECEDING AND CURRENT ROW``;
4. value = prev ⊕ cur, with the same ⊕ as the engine (sum, min, max, latest by (event
   time, event id), union of sketch buckets), then finalised the same way (mean = sum /
   count, ratio, linear-counting estimate).

Counts, integer sums, min, max, last and distinct counts are bit-identical to the engine
whatever the arrival order. Float sums are added one value at a time in the engine's
order (``arrayFold`` over events sorted by time within a tile, then over tiles in order,
then the tile's running sum), so they are bit-identical too when events arrive in time
order; an out-of-order event, or events sharing a millisecond, are added in another
order, and the sums then agree to ~1e-15 relative, not bit for bit.

The backfill sees every event: one the stream rejected as too late is counted here. An
event id that occurs more than once in the relation (a client's retry) counts once, as in the
stream; its copies are taken to be the same event. The relation needs ``event_id``,
``event_time`` (epoch ms, an integer), the entity field and the aggregated and filtered
fields; enums may be strings or ClickHouse Enums.

``values_at_sql(feature_set, relation, points)`` computes the values at arbitrary times
instead: for each (entity, time) of ``points``, every window evaluated at that time from the
events in it, whether or not an event happened then (a window read long after its last
event is empty). It joins each point to its entity's events and aggregates conditionally per
window: simpler than the tile frames above, and the reference that reads at any time are
held to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from features.definitions import FeatureSet, Measure
from features.predicates import sql_identifier
from features.windows import DISTINCT_BUCKETS, tile_ms

__all__ = ["backfill_sql", "own_columns", "tile_columns", "tiles_sql", "values_at_sql"]

Stage = Literal["tile", "frame", "running"]


@dataclass(frozen=True)
class _Col:
    """One measure in SQL: its per-event base column(s), its aggregates at each stage, ⊕."""

    index: int
    measure: Measure
    float_field: bool

    @property
    def m(self) -> str:
        return f"hw_m{self.index}"

    def base(self) -> list[str]:
        """Each event's contribution; a non-matching event contributes the kind's neutral value."""
        m = self.measure
        conds = [m.where.to_sql()] if m.where is not None else []
        if m.field is not None:
            conds.append(f"isNotNull({sql_identifier(m.field)})")
        cond = " AND ".join(conds) or "1"
        f = sql_identifier(m.field) if m.field else ""
        if m.kind == "count":
            return [f"toUInt64(if({cond}, 1, 0)) AS {self.m}"]
        if m.kind == "sum":
            cast = "toFloat64" if self.float_field else "toInt64"
            return [f"{cast}(if({cond}, ifNull({f}, 0), 0)) AS {self.m}"]
        if m.kind in ("min", "max"):
            return [f"if({cond}, {f}, NULL) AS {self.m}"]
        if m.kind == "last":
            return [f"toUInt64(if({cond}, 1, 0)) AS {self.m}", f"{f} AS hw_v{self.index}"]
        return [f"if({cond}, xxHash64(toString({f})) % {DISTINCT_BUCKETS}, NULL) AS {self.m}"]

    def aggregate(self, stage: Stage, out: str, over: str = "") -> list[str]:
        """Partials of a tile (from events), of the previous tiles (a frame over tiles), or of the
        events of the event's own tile up to it (a running frame over events)."""
        kind, src = self.measure.kind, (f"t{self.index}" if stage == "frame" else self.m)
        if kind == "sum" and self.float_field and stage != "running":
            # Float sums add one value at a time in event-time order, as the engine does:
            # sum() over a group or a moving frame adds in a vectorised order instead.
            values = (
                f"groupArray({src}){over}"
                if stage == "frame"
                else f"arrayMap(x -> x.3, arraySort(groupArray((hw_time, hw_id, {src}))))"
            )
            return [f"arrayFold((acc, x) -> acc + x, {values}, toFloat64(0)) AS {out}"]
        if kind in ("count", "sum"):
            return [f"sum({src}){over} AS {out}"]
        if kind in ("min", "max"):
            return [f"{kind}({src}){over} AS {out}"]
        if kind == "last":  # how many candidates, and the latest (event time, event id, value)
            if stage == "frame":
                return [f"sum({src}_n){over} AS {out}_n", f"max({src}_v){over} AS {out}_v"]
            latest = f"maxIf(tuple(hw_time, hw_id, hw_v{self.index}), {src} = 1)"
            return [f"sum({src}){over} AS {out}_n", f"{latest}{over} AS {out}_v"]
        if stage == "frame":
            return [f"groupUniqArrayArray({src}){over} AS {out}"]
        return [f"groupUniqArray({src}){over} AS {out}"]  # the sketch buckets hit

    def at_point(self, inside: str, out: str) -> list[str]:
        """The measure over the joined events for which ``inside`` holds (a point's window), in
        the columns :meth:`combine` makes."""
        kind, m = self.measure.kind, f"b.{self.m}"
        if kind in ("count", "sum"):
            if kind == "sum" and self.float_field:  # added in the engine's order: by time, then id
                events = f"groupArrayIf((b.hw_time, b.hw_id, {m}), {inside})"
                ordered = f"arrayMap(x -> assumeNotNull(x.3), arraySort({events}))"
                return [f"arrayFold((acc, x) -> acc + x, {ordered}, toFloat64(0)) AS {out}"]
            zero = "toUInt64(0)" if kind == "count" else "toInt64(0)"
            return [f"sumIf(ifNull({m}, {zero}), {inside}) AS {out}"]
        if kind in ("min", "max"):
            return [f"{kind}OrNullIf({m}, {inside} AND isNotNull({m})) AS {out}"]
        if kind == "last":
            flag = f"{inside} AND ifNull({m}, 0) = 1"
            latest = f"argMaxIf(b.hw_v{self.index}, (b.hw_time, b.hw_id), {flag})"
            return [f"countIf({flag}) AS {out}_n", f"{latest} AS {out}_v"]
        return [f"length(groupUniqArrayIf({m}, {inside} AND isNotNull({m}))) AS {out}"]

    def nothing(self, out: str) -> list[str]:
        """The partials of no tiles (the previous tiles of a one-tile window), typed like a tile's."""
        kind, t = self.measure.kind, f"t{self.index}"
        if kind in ("count", "sum"):
            return [f"{t} - {t} AS {out}"]
        if kind in ("min", "max"):
            return [f"if(0, {t}, NULL) AS {out}"]
        if kind == "last":  # no candidates: the value is never read
            return [f"{t}_n - {t}_n AS {out}_n", f"{t}_v AS {out}_v"]
        return [f"arrayFilter(x -> 0, {t}) AS {out}"]

    def combine(self, p: str, c: str, out: str) -> list[str]:
        """previous ⊕ running, as in the engine."""
        kind = self.measure.kind
        if kind in ("count", "sum"):
            return [f"{p} + {c} AS {out}"]
        if kind in ("min", "max"):
            pick = "least" if kind == "min" else "greatest"
            return [f"if(isNull({p}), {c}, if(isNull({c}), {p}, {pick}({p}, {c}))) AS {out}"]
        if kind == "last":
            newer = f"{c}_n > 0 AND ({p}_n = 0 OR {c}_v > {p}_v)"
            value = f"if({newer}, tupleElement({c}_v, 3), tupleElement({p}_v, 3))"
            return [f"{p}_n + {c}_n AS {out}_n", f"{value} AS {out}_v"]
        return [f"length(arrayDistinct(arrayConcat({p}, {c}))) AS {out}"]


@dataclass
class _Parts:
    """The pieces of the query, filled window by window."""

    ctes: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    named_windows: list[str] = field(default_factory=list)
    joins: list[str] = field(default_factory=list)
    combined: list[str] = field(default_factory=list)


def _join_key(tile: str) -> str:
    # One opaque key per window: with separate (entity, tile) equalities the optimiser may
    # reorder the joins and join two windows' tiles on the entity alone, a per-entity
    # cross product (seconds became minutes on the sample).
    return f"concat(hw_key, '|', toString({tile}))"


_NEWLINE = "\n    "


def _indent(items: list[str], sep: str = ",\n        ") -> str:
    return sep.join(items)


def _add_window(parts: _Parts, w: int, window_ms: int, cols: list[_Col]) -> None:
    """Steps 1 to 4 of the module docstring for window number ``w``."""
    tile = tile_ms(window_ms)
    n = window_ms // tile
    tiles = [a for col in cols for a in col.aggregate("tile", f"t{col.index}")]
    parts.ctes.append(
        f"tiles_{w} AS (\n    SELECT hw_key, intDiv(hw_time, {tile}) AS hw_tile,\n        {_indent(tiles)}\n"
        "    FROM base GROUP BY hw_key, hw_tile\n)"
    )
    if n > 1:
        prev = [a for col in cols for a in col.aggregate("frame", f"p{col.index}", " OVER f")]
        frame = f"PARTITION BY hw_key ORDER BY hw_tile RANGE BETWEEN {n - 1} PRECEDING AND 1 PRECEDING"
        window_clause = f"\n    WINDOW f AS ({frame})"
    else:
        prev, window_clause = [a for col in cols for a in col.nothing(f"p{col.index}")], ""
    parts.ctes.append(
        f"prev_{w} AS (\n    SELECT {_join_key('hw_tile')} AS hw_jk,\n        {_indent(prev)}\n"
        f"    FROM tiles_{w}{window_clause}\n)"
    )
    parts.running.append(f"{_join_key(f'intDiv(hw_time, {tile})')} AS hw_jk_{w}")
    parts.running += [a for col in cols for a in col.aggregate("running", f"c{w}_{col.index}", f" OVER c{w}")]
    parts.named_windows.append(
        f"c{w} AS (PARTITION BY hw_key, intDiv(hw_time, {tile}) ORDER BY hw_time "
        "RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)"
    )
    parts.joins.append(f"INNER JOIN prev_{w} AS w{w} ON cur.hw_jk_{w} = w{w}.hw_jk")
    for col in cols:
        parts.combined += col.combine(f"w{w}.p{col.index}", f"cur.c{w}_{col.index}", f"hw_{w}_{col.index}")


def _estimate(buckets: str) -> str:
    b, m = f"least({buckets}, {DISTINCT_BUCKETS - 1})", DISTINCT_BUCKETS
    return f"toInt64(round(-{m} * log(1 - {b} / {m})))"


def _columns(fs: FeatureSet) -> tuple[list[Measure], list[_Col], list[int], dict[int, list[_Col]]]:
    """The feature set's measures, their SQL columns, its windows and the columns each window needs."""
    measures: list[Measure] = []
    for feature in fs.features:
        measures.extend(m for m in feature.measures if m not in measures)
    cols = [
        _Col(i, m, m.field is not None and fs.fields[m.field].kind == "float") for i, m in enumerate(measures)
    ]
    windows = sorted({f.window_ms for f in fs.features})
    used: dict[int, list[_Col]] = {w: [] for w in windows}
    for feature in fs.features:
        for col in (cols[measures.index(m)] for m in feature.measures):
            if col not in used[feature.window_ms]:
                used[feature.window_ms].append(col)
    return measures, cols, windows, used


def _base_cte(fs: FeatureSet, cols: list[_Col], relation: str, time_range: str) -> str:
    """Every event of the relation in ``time_range`` with its contributions, once per event id."""
    key = sql_identifier(fs.entity)
    base = [f"toString({key}) AS hw_key", "toInt64(`event_time`) AS hw_time", "toString(`event_id`) AS hw_id"]
    base += [expr for col in cols for expr in col.base()]
    return (
        f"base AS (\n    SELECT {_indent(base)}\n    FROM {relation}\n"
        f"    WHERE isNotNull({key}) AND hw_key != '' AND hw_id != ''\n      AND {time_range}\n"
        "    LIMIT 1 BY hw_id\n)"
    )


def _finish(fs: FeatureSet, measures: list[Measure], windows: list[int], name: str) -> list[str]:
    """Each feature's value from its measures' combined columns (``name(w, i)``), as the engine."""
    outputs = []
    for feature in fs.features:
        w = windows.index(feature.window_ms)
        first, last = (
            name.format(w=w, i=measures.index(m)) for m in (feature.measures[0], feature.measures[-1])
        )
        if feature.kind in ("mean", "ratio"):
            expr = f"if({last} = 0, NULL, {first} / {last})"
        elif feature.kind == "last":
            value = f"toString({first}_v)" if feature.dtype == "string" else f"{first}_v"
            expr = f"if({first}_n = 0, NULL, {value})"
        elif feature.kind == "approx_distinct":
            expr = _estimate(first)
        else:
            expr = first
        outputs.append(f"{expr} AS {sql_identifier(feature.name)}")
    return outputs


def values_at_sql(feature_set: FeatureSet, relation: str, points: str) -> str:
    """ClickHouse SQL for the feature set's values at each (entity, time) of ``points``.

    ``points`` is a relation with columns ``entity_key`` (String) and ``at`` (epoch ms); the
    result has ``entity_key``, ``at`` and one column per feature, one row per distinct point.
    The events are those of ``relation`` as in :func:`backfill_sql`; an event at exactly
    ``at`` counts, a later one does not.
    """
    fs = feature_set
    measures, cols, windows, used = _columns(fs)
    starts = {w: f"(intDiv(p.hw_at, {tile_ms(w)}) - {w // tile_ms(w) - 1}) * {tile_ms(w)}" for w in windows}
    select: list[str] = []
    for w, window_ms in enumerate(windows):
        inside = f"ifNull(b.hw_time >= {starts[window_ms]} AND b.hw_time <= p.hw_at, 0)"
        for col in used[window_ms]:
            select += col.at_point(inside, f"v{w}_{col.index}")
    earliest = starts[windows[-1]]
    return (
        "WITH\n"
        + _base_cte(fs, cols, relation, "1")
        + ",\npts AS (\n    SELECT DISTINCT toString(entity_key) AS hw_key, toInt64(at) AS hw_at "
        + f"FROM {points}\n),\n"
        + "joined AS (\n    SELECT p.hw_key AS hw_key, p.hw_at AS hw_at,\n        "
        + _indent(select)
        + "\n    FROM pts AS p LEFT JOIN base AS b ON b.hw_key = p.hw_key\n"
        + f"      AND b.hw_time <= p.hw_at AND b.hw_time >= {earliest}\n"
        + "    GROUP BY p.hw_key, p.hw_at\n    SETTINGS join_use_nulls = 1\n)\n"
        + "SELECT\n    hw_key AS entity_key, hw_at AS at,\n    "
        + _indent(_finish(fs, measures, windows, "v{w}_{i}"), ",\n    ")
        + "\nFROM joined\nORDER BY entity_key, at"
    )


def _partial_columns(cols: list[_Col], prefix: str) -> list[list[str]]:
    return [
        [f"{prefix}{c.index}_n", f"{prefix}{c.index}_v"]
        if c.measure.kind == "last"
        else [f"{prefix}{c.index}"]
        for c in cols
    ]


def own_columns(feature_set: FeatureSet) -> list[list[list[str]]]:
    """Per window, per measure it needs (in the engine's order), the columns ``backfill_sql(...,
    own=True)`` gives the row's own-tile partial in: one, or two (count, latest) for ``last``."""
    _, _, windows, used = _columns(feature_set)
    return [_partial_columns(used[window_ms], f"own_{w}_") for w, window_ms in enumerate(windows)]


def tile_columns(feature_set: FeatureSet) -> list[list[list[str]]]:
    """Per window, per measure, the columns of :func:`tiles_sql` holding its partial (as own_columns)."""
    _, _, windows, used = _columns(feature_set)
    return [_partial_columns(used[window_ms], "t") for window_ms in windows]


def tiles_sql(feature_set: FeatureSet, relation: str, start: int, end: int, window: int) -> str:
    """ClickHouse SQL for the partials of window number ``window``'s tiles (one row per entity and
    tile with events), from the events ``backfill_sql`` reads for ``[start, end)``: columns
    ``entity_key``, ``tile``, then per measure of the window (the engine's order) its partial,
    named as :func:`tile_columns` says; sketches' buckets ascending. By entity, then tile."""
    fs = feature_set
    _, cols, windows, used = _columns(fs)
    tile = tile_ms(windows[window])
    select: list[str] = []
    for col in used[windows[window]]:
        if col.measure.kind == "distinct":  # ascending, as the engine writes a sketch's buckets
            select.append(f"arraySort(groupUniqArray({col.m})) AS t{col.index}")
        else:
            select += col.aggregate("tile", f"t{col.index}")
    time_range = f"hw_time >= {max(start - fs.max_window_ms, 0)} AND hw_time < {end}"
    return (
        f"WITH\n{_base_cte(fs, cols, relation, time_range)}\n"
        f"SELECT hw_key AS entity_key, intDiv(hw_time, {tile}) AS tile,\n    {_indent(select)}\n"
        "FROM base GROUP BY entity_key, tile ORDER BY entity_key, tile"
    )


def backfill_sql(
    feature_set: FeatureSet, relation: str, start: int, end: int, order: bool = True, *, own: bool = False
) -> str:
    """ClickHouse SQL for the feature set's values at every source event time in ``[start, end)`` (ms).

    ``relation`` is a table, view or table function with the source event's fields as
    columns, ``event_time`` in epoch milliseconds. ``order`` sorts by entity and time. ``own``
    adds each row's own-tile partials (:func:`own_columns`): with :func:`tiles_sql`, what the
    row's tiles are made of (:mod:`features.tiles`).
    """
    fs = feature_set
    measures, cols, windows, used = _columns(fs)
    parts = _Parts()
    parts.ctes.append(
        _base_cte(fs, cols, relation, f"hw_time >= {max(start - fs.max_window_ms, 0)} AND hw_time < {end}")
    )
    for w, window_ms in enumerate(windows):
        _add_window(parts, w, window_ms, used[window_ms])
        if own:
            for col in used[window_ms]:
                suffixes = ["_n", "_v"] if col.measure.kind == "last" else [""]
                parts.combined += [f"cur.c{w}_{col.index}{x} AS own_{w}_{col.index}{x}" for x in suffixes]
    parts.ctes.append(
        f"cur AS (\n    SELECT hw_key, hw_time,\n        {_indent(parts.running)}\n"
        f"    FROM base\n    WINDOW {_indent(parts.named_windows)}\n)"
    )
    parts.ctes.append(
        f"combined AS (\n    SELECT cur.hw_key AS hw_key, cur.hw_time AS hw_time,\n        "
        f"{_indent(parts.combined)}\n    FROM cur\n    {_indent(parts.joins, _NEWLINE)}\n"
        f"    WHERE cur.hw_time >= {start}\n)"
    )

    outputs = ["hw_key AS entity_key", "hw_time AS event_time", *_finish(fs, measures, windows, "hw_{w}_{i}")]
    if own:
        outputs += [c for window in own_columns(fs) for measure in window for c in measure]
    sql = (
        "WITH\n"
        + ",\n".join(parts.ctes)
        + "\nSELECT\n    "
        + _indent(outputs, ",\n    ")
        + "\nFROM combined\n"
    )
    if order:
        sql += "ORDER BY entity_key, event_time\n"
    # Events sharing an entity and a time have equal values (RANGE frames include peers): one row each.
    return sql + "LIMIT 1 BY entity_key, event_time"
