"""The streaming feature engine: pure per-event logic the Faust processor and the Flink job run.

``Aggregator(feature_set).apply(event, write_time)`` folds one decoded source event into
its entity's state and returns the ``feature_update`` records it causes: one for the event
itself, plus corrections when the event came out of order (see :mod:`features.windows`,
which defines what every number means). Nothing here does I/O or reads a clock: the
caller passes ``write_time`` (the time of processing) and the watermarks, and the state is
plain data that :meth:`EntityState.to_bytes` turns into bytes for the processor's store.

Per entity and window the state is one partial aggregate per tile: the current tile, the
closed tiles still inside the window (plus those an in-lateness event may still need),
and the aggregate of the closed tiles in the window (``previous``). An in-order event
costs a few additions; when a tile closes, counts and integer sums subtract the tiles
that left the window, and the other aggregates (float sums, min, max, last, distinct) are
recomputed from the tiles in order, which keeps float sums in the same order as the
ClickHouse backfill. The state also keeps a snapshot of the partial aggregates at each
event time within the lateness (with that time's own-tile partials and the ids of its
events): an out-of-order event starts from the snapshot just before it, and is added to the
snapshots after it, which become the corrections; a second event with an id already seen
there is a duplicate (a client's retry) and counts once.

**Tiles in every update.** A value at event time t does not stay true: as time passes,
tiles leave the window (an inactive user's ``clicks_24h`` falls to 0). So every update also
carries its entity's tiles at t, the partial aggregates of each window's tiles from the
window's first tile to t's own (up to t), and ``valid_until``: the first time a non-empty
tile leaves a window, before which the values hold as given. A reader at time r >= t
evaluates the windows at r from the tiles (:meth:`Aggregator.evaluate`, with
:func:`evaluate_tiles` to find the definition by the tiles' layout id): the online store on
every read past ``valid_until``, training sets at each label time. The tiles are msgpack::

    [layout id, [window: own tile index], [window: [closed tile row, ...]], own partials]
    tile row: [tile index, partial of each of the window's measures]

with each window's closed rows ascending by tile index, and the own (the update's) tiles'
partials last, every window's in one flat list. A ``last`` partial is its value, a distinct
sketch its bucket numbers (or, past a dozen, its bit mask's bytes). Closed tiles are encoded
once and cached with the entity's state, so an in-order event encodes only its own tiles; a
reader skips, unread, the windows whose tiles have all left.

A feature set's filters and per-event contributions, and the finalisation of its values,
are compiled once into two small Python lambdas (readable in ``contributions_source`` and
``values_source``), the Python twin of :mod:`features.sql`. The in-order path stays at a
few microseconds per event: ``benchmarks/features_engine.py`` measures it.
"""

from __future__ import annotations

import itertools
import json
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from functools import reduce as functools_reduce
from operator import add, itemgetter
from typing import Any

import msgpack
import xxhash

from features.definitions import FeatureSet, Measure, feature_set_by_layout
from features.windows import distinct_bucket, distinct_estimate, tile_ms
from headwater.errors import HeadwaterError

__all__ = [
    "Aggregator",
    "EntityState",
    "Evaluations",
    "EventRejected",
    "TileCache",
    "evaluate_tiles",
    "tiles_layout",
    "update_event_id",
]

Partial = Any  # int | float | None | [t, event_id, value] | bucket bitmask (int)
Snapshot = list[Partial]  # every window's partials, flat (see _WindowPlan)
Record = Mapping[str, Any]


class EventRejected(HeadwaterError):  # noqa: N818 - a verdict on an event, not a failure
    """A source event the engine will not aggregate; the processor dead-letters it with ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")  # the reason first: dead letters carry the text
        self.reason = reason


def update_event_id(feature_set: str, version: int, entity_key: str, event_time: int, source_id: str) -> str:
    """Deterministic id of a feature update, so that a replay produces the same ids."""
    return xxhash.xxh3_128_hexdigest(
        f"{feature_set}\x1f{version}\x1f{entity_key}\x1f{event_time}\x1f{source_id}".encode()
    )


# --- measures: how one event contributes, how partials combine --------------------------------


def _add(a: Partial, b: Partial) -> Partial:
    return a + b


def _min(a: Partial, b: Partial) -> Partial:
    return b if a is None or (b is not None and b < a) else a


def _max(a: Partial, b: Partial) -> Partial:
    return b if a is None or (b is not None and b > a) else a


def _last(a: Partial, b: Partial) -> Partial:
    if a is None:
        return b
    if b is None:
        return a
    return b if b[0] > a[0] or (b[0] == a[0] and b[1] > a[1]) else a


def _or(a: Partial, b: Partial) -> Partial:
    return a | b


_COMBINE: dict[str, Callable[[Partial, Partial], Partial]] = {
    "count": _add,
    "sum": _add,
    "min": _min,
    "max": _max,
    "last": _last,
    "distinct": _or,
}


def _contribution_source(m: Measure, k: int, float_field: bool) -> str:
    """Python expression for one event's partial of measure ``m`` (None: the event does not count).

    Over the event ``r``, its event time ``t`` and id ``i``; ``k`` keeps walrus names apart.
    """
    cond = m.where.python("r") if m.where is not None else None
    if m.field is None:  # a count of events
        return "1" if cond is None else f"(1 if {cond} else None)"
    v = f"_v{k}"
    skip = f"(({v} := r.get({m.field!r})) is None" + (f" or not {cond})" if cond else ")")
    if m.kind == "count":
        return f"(None if {skip} else 1)"
    if m.kind == "sum" and float_field:
        return f"(None if {skip} else float({v}))"
    if m.kind in ("sum", "min", "max"):
        return f"(None if {skip} else {v})"
    if m.kind == "last":
        return f"(None if {skip} else [t, i, {v}])"
    return f"(None if {skip} else 1 << _bucket({v}))"


def _value_source(kind: str, first: int, last: int) -> str:
    """Python expression for a feature's value from the snapshot ``s``: mean and ratio divide
    their first measure by their last, the others read their one measure."""
    if kind in ("mean", "ratio"):
        return f"(s[{first}] / s[{last}] if s[{last}] else None)"
    if kind == "last":
        return f"(None if s[{first}] is None else s[{first}][2])"
    if kind == "approx_distinct":
        return f"_estimate(s[{first}].bit_count())"
    return f"s[{first}]"


def _identity(m: Measure, float_field: bool) -> Partial:
    if m.kind in ("count", "distinct"):
        return 0
    if m.kind == "sum":
        return 0.0 if float_field else 0
    return None


def _call(combine: Callable[[Partial, Partial], Partial], a: Partial, b: Partial) -> Partial:
    return combine(a, b)


_packb = msgpack.packb
_index = itemgetter(0)


def _sum_of(start: Partial) -> Callable[[Sequence[Any]], Partial]:
    def total(column: Sequence[Any]) -> Partial:  # one at a time, oldest first: as fold() adds
        return functools_reduce(add, column, start)

    return total


def _extreme_of(pick: Callable[..., Any]) -> Callable[[Partial], Callable[[Sequence[Any]], Partial]]:
    def make(_: Partial) -> Callable[[Sequence[Any]], Partial]:
        def extreme(column: Sequence[Any]) -> Partial:
            present = [x for x in column if x is not None]
            return pick(present) if present else None

        return extreme

    return make


def _last_of(_: Partial) -> Callable[[Sequence[Any]], Partial]:
    def last(column: Sequence[Any]) -> Partial:  # rows are in time order: the newest non-null
        for value in reversed(column):
            if value is not None:
                return [1, "", value]  # in the engine's form; only the value is read
        return None

    return last


def _union_of(_: Partial) -> Callable[[Sequence[Any]], Partial]:
    def union(column: Sequence[Any]) -> Partial:
        # Bucket lists (most tiles' sketches) are merged in one set union, in C, and the mask
        # built once: per tile, a mask built bucket by bucket was most of a busy entity's read.
        mask = 0
        if bytes in map(type, column):  # a dense sketch among them (a busy tile: a mask's bytes)
            for sketch in column:
                if type(sketch) is bytes:
                    mask |= int.from_bytes(sketch, "little")
            column = [sketch for sketch in column if type(sketch) is not bytes]
        for bucket in set().union(*column):
            mask |= 1 << bucket
        return mask

    return union


_REDUCERS: dict[str, Callable[[Partial], Callable[[Sequence[Any]], Partial]]] = {
    "count": _sum_of,
    "sum": _sum_of,
    "min": _extreme_of(min),
    "max": _extreme_of(max),
    "last": _last_of,
    "distinct": _union_of,
}


_SPARSE_SKETCH = 12  # buckets: up to this many, a sketch is written as its bucket numbers


def _sketch(mask: int) -> list[int] | bytes:
    """A distinct sketch as msgpack can hold it (it has no 1,024-bit integers): a few buckets as
    their numbers, ascending (a user's sketch in a tile: a few bytes); more as the mask's
    little-endian bytes (a busy item's: at most 128 bytes, converted in C both ways)."""
    if mask.bit_count() > _SPARSE_SKETCH:
        return mask.to_bytes((mask.bit_length() + 7) // 8, "little")
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def _array_header(count: int) -> bytes:
    """A msgpack array header: rows encoded one by one are joined under it without a re-encode."""
    if count < 16:
        return bytes((0x90 | count,))
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


class _WindowPlan:
    """Static facts about one window of a feature set: its tiles and its slice of the partials.

    An entity's partials for all windows live in one flat list; window w owns positions
    ``offset .. offset + len(measures) - 1``, one per measure it needs.
    """

    def __init__(
        self, window_ms: int, offset: int, measures: list[int], all_measures: list[Measure], floats: set[int]
    ) -> None:
        self.window_ms = window_ms
        self.tile = tile_ms(window_ms)
        self.n = window_ms // self.tile
        self.offset, self.end = offset, offset + len(measures)
        self.measures = measures  # indices into the feature set's measures
        self.combine = [_COMBINE[all_measures[i].kind] for i in measures]
        self.identity = [_identity(all_measures[i], i in floats) for i in measures]
        # Counts and integer sums subtract exactly, so they are kept incrementally when a tile
        # closes; everything else is recomputed from the tiles, oldest first.
        exact = [
            all_measures[i].kind == "count" or (all_measures[i].kind == "sum" and i not in floats)
            for i in measures
        ]
        self.exact_at = [(offset + j, j) for j, e in enumerate(exact) if e]  # (flat position, j)
        self.recompute = [j for j, e in enumerate(exact) if not e]
        kinds = [all_measures[i].kind for i in measures]
        # Tile rows (see the module docstring): measures whose partial is not plain msgpack data.
        self.lasts = [j for j, k in enumerate(kinds) if k == "last"]
        self.sketches = [j for j, k in enumerate(kinds) if k == "distinct"]
        # Per measure: its tiles' partials as written in rows (oldest first) -> their combination.
        self._reducers = [_REDUCERS[k](x) for k, x in zip(kinds, self.identity, strict=True)]

    def row_values(self, index: int, part: list[Partial]) -> list[Any]:
        """One tile as a row: its index, then each measure's partial as msgpack holds it."""
        row = [index, *part]
        for j in self.lasts:
            if row[j + 1] is not None:
                row[j + 1] = row[j + 1][2]  # the value: rows are in time order, so the last wins
        for j in self.sketches:
            row[j + 1] = _sketch(row[j + 1])
        return row

    def row(self, index: int, part: list[Partial]) -> bytes:
        """:meth:`row_values` encoded."""
        row: bytes = _packb(self.row_values(index, part))
        return row

    def suffix(self, rows: list[list[Any]], lo: int) -> tuple[list[Partial], int | None]:
        """The partials of the tiles with index >= lo among ``rows`` (a decoded window), combined
        oldest first like :meth:`fold`, and when the first of those tiles leaves the window
        (None: no tile left, the window stays empty)."""
        first = bisect_left(rows, lo, key=_index)
        if first == len(rows):
            return self.identity.copy(), None
        columns = list(zip(*rows[first:], strict=True))  # a column per measure, after the indices
        acc = [reduce(column) for reduce, column in zip(self._reducers, columns[1:], strict=True)]
        return acc, (rows[first][0] + self.n) * self.tile

    def fold(self, starts: list[int], parts: list[list[Partial]], lo: int, hi: int) -> list[Partial]:
        """Aggregate of the closed tiles with lo <= index <= hi, combined oldest first."""
        acc = self.identity.copy()
        combine = self.combine
        for k in range(bisect_left(starts, lo), bisect_right(starts, hi)):
            acc = list(map(_call, combine, acc, parts[k]))
        return acc


@dataclass(slots=True, eq=False)
class TileCache:
    """One entity's encoded tiles, kept between its updates: per window each closed tile's row
    (parallel to the tile indices), and for the last update's own tiles (one index per window)
    the tiles' bytes up to the own rows and until when the values hold: the same for every
    update until one of those tiles changes."""

    rows: list[list[bytes]] | None = None
    windows: list[tuple[int, bytes, int]] | None = None  # per window: own tile, closed rows, leaves at
    key: list[int] | None = None
    prefix: bytes = b""
    valid_until: int = 0


@dataclass(slots=True, eq=False)
class EntityState:
    """Everything the engine remembers about one entity of one feature set (plain data).

    Per window w: ``tiles[w]`` is the newest tile's index (-1 before any event), its partials
    are in ``current`` and the closed tiles of its window combined are in ``previous`` (both
    flat, see :class:`_WindowPlan`); ``starts[w]``/``parts[w]`` are the closed tiles kept.
    ``times``/``snapshots`` hold the partials at each distinct event time within the
    lateness and the one before it, ascending; ``owns`` the same times' own-tile partials
    (what a tile row of an update at that time holds) and ``ids`` the ids of their events.
    """

    max_time: int | None  # largest accepted event time
    tiles: list[int]
    current: list[Partial]
    previous: list[Partial]
    starts: list[list[int]]
    parts: list[list[list[Partial]]]
    times: list[int]
    snapshots: list[Snapshot]
    owns: list[Snapshot]
    ids: list[list[str]]
    # The closed tiles' encoded rows: derived, so never stored, and dropped when a closed tile
    # changes out of order.
    cache: TileCache | None = field(default=None)

    def to_bytes(self) -> bytes:
        return json.dumps([getattr(self, s) for s in _STATE_FIELDS], separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> EntityState:
        fields = json.loads(raw)
        if len(fields) != len(_STATE_FIELDS):
            raise HeadwaterError(
                "a feature processor's stored state predates the window tiles of this version: "
                "delete the processor's state folder (<data_dir>/state/features-*) and process the "
                "source topic again"
            )
        return cls(*fields)


_STATE_FIELDS = (
    "max_time", "tiles", "current", "previous", "starts", "parts", "times", "snapshots", "owns", "ids",
)  # fmt: skip


class Aggregator:
    """Computes one feature set over its source events, one event at a time.

    Lateness is judged against a watermark the caller passes per event (``late_before``: the
    event is too late below it) with the state's retention ``horizon`` (no event below it can
    still be accepted, so the state keeps nothing older); the stream processor derives both
    from its input partitions (:mod:`features.windows`). Without them the input is one
    partition: an event is too late when it is more than the lateness behind the largest
    event time accepted so far. ``max_future_ms``: an event time further than that ahead of
    ``write_time`` (the time of processing) is rejected as ``future`` (a client with a wrong
    clock must not become every entity's latest time).
    """

    def __init__(
        self,
        feature_set: FeatureSet,
        states: MutableMapping[str, EntityState] | None = None,
        *,
        max_future_ms: int | None = None,
    ) -> None:
        fs = feature_set
        self.feature_set = fs
        self.states: MutableMapping[str, EntityState] = states if states is not None else {}
        self.stats: Counter[str] = Counter()
        self._entity, self._name, self._version = fs.entity, fs.name, fs.version
        self._lateness = fs.lateness_ms
        self.max_future_ms = max_future_ms
        self.max_time: int | None = None  # largest event time accepted (the one-partition watermark)
        measures: list[Measure] = []
        for feature in fs.features:
            measures.extend(m for m in feature.measures if m not in measures)
        self.measures = measures
        floats = {
            i for i, m in enumerate(measures) if m.field is not None and fs.fields[m.field].kind == "float"
        }
        # Filters and contributions of all measures, and the finalisation of all features, are
        # compiled once into two lambdas (the Python twin of features.sql): a closure per
        # measure cost a third of the per-event budget. Their sources stay readable here.
        self.contributions_source = (
            "lambda r, t, i: ["
            + ", ".join(_contribution_source(m, k, k in floats) for k, m in enumerate(measures))
            + "]"
        )
        self._contributions: Callable[[Record, int, str], list[Partial]] = eval(
            self.contributions_source, {"_bucket": distinct_bucket, "float": float}
        )
        window_ms = sorted({f.window_ms for f in fs.features})
        per_window: dict[int, list[int]] = {w: [] for w in window_ms}
        for feature in fs.features:
            used = per_window[feature.window_ms]
            used.extend(i for i in (measures.index(m) for m in feature.measures) if i not in used)
        self._windows: list[_WindowPlan] = []
        for w in window_ms:
            offset = self._windows[-1].end if self._windows else 0
            self._windows.append(_WindowPlan(w, offset, per_window[w], measures, floats))
        self._tile_sizes = [p.tile for p in self._windows]
        self._advance_plans = [
            (p.tile, p.n, p.offset, p.end, p.exact_at, p.identity, p.recompute) for p in self._windows
        ]
        # Flat positions fed by each measure; counts and sums just add, the rest combine.
        flat = [(p.offset + j, i, p.combine[j]) for p in self._windows for j, i in enumerate(p.measures)]
        self._adds = [(pos, i) for pos, i, comb in flat if comb is _add]
        self._others = [(pos, i, comb) for pos, i, comb in flat if comb is not _add]
        self._combine = [comb for _, _, comb in flat]
        self._identity = [x for p in self._windows for x in p.identity]
        # Every tile blob starts with [layout id, [window 1's closed rows, ...]: its first bytes.
        self._tiles_head = _array_header(4) + _packb(fs.layout_id)
        self._lasts = [p.offset + j for p in self._windows for j in p.lasts]  # flat positions
        self._sketches = [p.offset + j for p in self._windows for j in p.sketches]
        self._special = bool(self._lasts or self._sketches)
        values: list[str] = []
        for feature in fs.features:
            plan = self._windows[window_ms.index(feature.window_ms)]
            first, last = (
                plan.offset + plan.measures.index(measures.index(m))
                for m in (feature.measures[0], feature.measures[-1])
            )
            values.append(f"{feature.name!r}: {_value_source(feature.kind, first, last)}")
        self.values_source = "lambda s: {" + ", ".join(values) + "}"
        self.values: Callable[[list[Partial]], dict[str, Any]] = eval(
            self.values_source, {"_estimate": distinct_estimate}
        )

    # --- the public API --------------------------------------------------------------------------

    @property
    def plans(self) -> list[_WindowPlan]:
        """The feature set's windows, shortest first: each one's tiles and measures (read-only)."""
        return self._windows

    def new_state(self) -> EntityState:
        k = len(self._windows)
        return EntityState(
            None, [-1] * k, self._identity.copy(), self._identity.copy(), [[] for _ in range(k)],
            [[] for _ in range(k)], [], [], [], [],
        )  # fmt: skip

    def entity_key(self, record: Record) -> str:
        key = record.get(self._entity)
        if key is None or key == "":
            self.stats["rejected_missing_entity"] += 1
            raise EventRejected("missing_entity", f"{self._name}: event has no {self._entity} (entity key)")
        return key if type(key) is str else str(key)

    def apply(
        self,
        record: Record,
        write_time: int,
        *,
        late_before: int | None = None,
        horizon: int | None = None,
    ) -> list[dict[str, Any]]:
        """Fold one event into its entity's state in :attr:`states`; return the updates it causes.

        The first update is the event's own (values at its event time); any further ones are
        corrections of later event times, ascending. Raises :class:`EventRejected` for an
        event without entity key, event time or event id, one beyond the allowed lateness
        (below ``late_before``), one too far in the future, and a duplicate of an event id
        already counted. See the class docstring for ``late_before`` and ``horizon``.
        """
        key = self.entity_key(record)
        state = self.states.get(key)
        if state is None:
            state = self.new_state()
        updates = self.step(state, key, record, write_time, late_before=late_before, horizon=horizon)
        self.states[key] = state
        return updates

    def step(
        self,
        state: EntityState,
        key: str,
        record: Record,
        write_time: int,
        *,
        late_before: int | None = None,
        horizon: int | None = None,
    ) -> list[dict[str, Any]]:
        """The pure core: fold ``record`` into ``state`` (of entity ``key``, mutated); return the updates."""
        t = record.get("event_time")
        if type(t) is not int or t < 0:
            self.stats["rejected_bad_event_time"] += 1
            raise EventRejected("bad_event_time", f"{self._name}: event_time {t!r} is not epoch ms >= 0")
        source_id = record.get("event_id")
        if type(source_id) is not str or not source_id:
            self.stats["rejected_missing_event_id"] += 1
            raise EventRejected("missing_event_id", f"{self._name}: event has no event_id")
        if self.max_future_ms is not None and t > write_time + self.max_future_ms:
            self.stats["rejected_future"] += 1
            raise EventRejected(
                "future",
                f"{self._name}: event {source_id} of {key} at {t} is {t - write_time} ms ahead of the "
                f"time of processing (more than {self.max_future_ms} ms): is the sender's clock right?",
            )
        if late_before is None:  # one partition: the watermark is the largest time accepted
            late_before = self.max_time - self._lateness if self.max_time is not None else t
        if t < late_before:
            self.stats["rejected_too_late"] += 1
            raise EventRejected(
                "too_late",
                f"{self._name}: event {source_id} of {key} at {t} is more than {self._lateness} ms "
                f"behind its partition's watermark ({late_before + self._lateness})",
            )
        times = state.times
        if times and t <= times[-1]:
            pos = bisect_left(times, t)
            if pos < len(times) and times[pos] == t and source_id in state.ids[pos]:
                self.stats["rejected_duplicate"] += 1
                raise EventRejected(
                    "duplicate", f"{self._name}: event {source_id} of {key} at {t} was already counted"
                )
        if horizon is None:
            horizon = late_before
        if self.max_time is None or t > self.max_time:
            self.max_time = t
        contributions = self._contributions(record, t, source_id)
        max_time = state.max_time
        if max_time is None or t >= max_time:
            snapshot, own = self._in_order(state, t, source_id, contributions, horizon)
            return [self._update(state, key, t, source_id, snapshot, own, write_time)]
        self.stats["out_of_order"] += 1
        return self._out_of_order(
            state, key, t, source_id, contributions=contributions, write_time=write_time
        )

    def evaluate(self, tiles: bytes, at: int) -> tuple[dict[str, Any], int | None]:
        """Every feature's value at time ``at`` from an update's tiles, and the first time after
        ``at`` that a value may change (a tile leaves a window; None: every window is empty and
        stays so). ``at`` before the update's event time reads as that time: tiles hold nothing
        older."""
        unpacker = _unpacker(tiles)
        layout = unpacker.unpack()
        if layout != self.feature_set.layout_id:
            raise HeadwaterError(
                f"{self._name}: tiles of layout {layout:x} given to the definition of layout "
                f"{self.feature_set.layout_id:x}: use evaluate_tiles"
            )
        return self._evaluate(unpacker, at)

    def _evaluate(self, unpacker: msgpack.Unpacker, at: int) -> tuple[dict[str, Any], int | None]:
        """:meth:`evaluate` from the own tiles on: windows whose every tile has left by ``at`` are
        skipped unread (a read long after the last event decodes only the longest window)."""
        own_tiles = unpacker.unpack()
        unpacker.read_array_header()
        closed: list[list[list[Any]] | None] = []
        for plan, c in zip(self._windows, own_tiles, strict=True):
            if at // plan.tile - plan.n + 1 > c:  # even the own tile left: empty
                unpacker.skip()
                closed.append(None)
            else:
                closed.append(unpacker.unpack())
        own = unpacker.unpack()
        snapshot: Snapshot = []
        until: int | None = None
        for plan, rows, c in zip(self._windows, closed, own_tiles, strict=True):
            if rows is None:
                snapshot.extend(plan.identity)
                continue
            rows.append([c, *own[plan.offset : plan.end]])
            part, leaves = plan.suffix(rows, at // plan.tile - plan.n + 1)
            snapshot.extend(part)
            if leaves is not None and (until is None or leaves < until):
                until = leaves
        return self.values(snapshot), until

    def evict_idle(self, before: int) -> int:
        """Forget entities whose latest event is older than ``before``; returns how many.

        Pass ``before = watermark - largest window - lateness``. Every window of such an entity
        is empty for any event that can still arrive in time, so forgetting it changes no
        value; only an event more than the lateness older than its last one is no longer
        recognised as too late (the backfill counts it anyway).
        """
        idle = [k for k, s in self.states.items() if s.max_time is not None and s.max_time < before]
        for k in idle:
            del self.states[k]
        return len(idle)

    # --- internals -------------------------------------------------------------------------------

    def _update(  # noqa: PLR0917 - internal, called in three places with the same order
        self,
        state: EntityState,
        key: str,
        t: int,
        source_id: str,
        snapshot: Snapshot,
        own: Snapshot,
        write_time: int,
    ) -> dict[str, Any]:
        tiles, valid_until = self._tiles(state, t, own)
        return {
            "event_id": update_event_id(self._name, self._version, key, t, source_id),
            "feature_set": self._name,
            "feature_set_version": self._version,
            "entity_key": key,
            "event_time": t,
            "write_time": write_time,
            "values": self.values(snapshot),
            "source": "STREAM",
            "valid_until": valid_until,
            "tiles": tiles,
        }

    def _tiles(self, state: EntityState, t: int, own: Snapshot) -> tuple[bytes, int]:
        """The tiles of an update at t (own: t's own-tile partials) and until when its values hold."""
        if state.cache is None:
            state.cache = TileCache()
        return self.encode_tiles(state.starts, state.parts, t, own, state.cache)

    def encode_tiles(
        self,
        starts: list[list[int]],
        parts: list[list[list[Partial]]],
        t: int,
        own: Snapshot,
        cache: TileCache,
    ) -> tuple[bytes, int]:
        """The tiles of an update at t and until when its values hold, from an entity's closed
        tiles (per window: their indices, ascending, and partials; those in t's window before
        t's tile are used) and t's own-tile partials (flat). ``cache`` keeps the encoded rows of
        one entity's tiles between calls: give each entity its own, and drop it when a closed
        tile changes (the engine does; the backfill's tiles never change)."""
        own_tiles = [t // size for size in self._tile_sizes]
        if cache.key != own_tiles:  # another tile of some window: its closed rows change
            self._closed_prefix(starts, parts, own_tiles, cache)
        if self._special:  # lasts and sketches as msgpack holds them (see _WindowPlan.row_values)
            own = own.copy()
            for pos in self._lasts:
                if own[pos] is not None:
                    own[pos] = own[pos][2]
            for pos in self._sketches:
                own[pos] = _sketch(own[pos])
        return cache.prefix + _packb(own), cache.valid_until

    def _closed_prefix(
        self,
        starts: list[list[int]],
        parts: list[list[list[Partial]]],
        own_tiles: list[int],
        cache: TileCache,
    ) -> None:
        """The bytes of an update's tiles before its own tiles (layout id and closed rows), and
        until when its values hold (the oldest non-empty tile of a window leaves), into ``cache``.
        A window whose own tile did not change keeps its closed rows (they change only when a
        tile closes or leaves, which moves the own tile)."""
        if cache.rows is None:
            cache.rows = [
                [plan.row(i, part) for i, part in zip(starts[w], parts[w], strict=True)]
                for w, plan in enumerate(self._windows)
            ]
        windows = cache.windows
        if windows is None:
            windows = cache.windows = [(-1, b"", 0)] * len(self._windows)
        prefix = [self._tiles_head, _packb(own_tiles), _array_header(len(self._windows))]
        valid_until: int | None = None
        for w, (plan, c) in enumerate(zip(self._windows, own_tiles, strict=True)):
            window = windows[w]
            if window[0] != c:
                tiles = starts[w]
                first, end = bisect_left(tiles, c - plan.n + 1), bisect_left(tiles, c)
                closed = b"".join((_array_header(end - first), *cache.rows[w][first:end]))
                window = windows[w] = (c, closed, ((tiles[first] if end > first else c) + plan.n) * plan.tile)
            prefix.append(window[1])
            if valid_until is None or window[2] < valid_until:
                valid_until = window[2]
        assert valid_until is not None  # a feature set has at least one window
        cache.key, cache.prefix, cache.valid_until = own_tiles, b"".join(prefix), valid_until

    def _in_order(
        self, state: EntityState, t: int, source_id: str, contributions: list[Partial], horizon: int
    ) -> tuple[Snapshot, Snapshot]:
        state.max_time = t
        tiles = state.tiles
        for w, size in enumerate(self._tile_sizes):
            if t // size != tiles[w]:
                self._advance(state, w, t // size, horizon)
        cur = state.current
        for pos, i in self._adds:
            x = contributions[i]
            if x is not None:
                cur[pos] += x
        if self._others:
            for pos, i, combine in self._others:
                x = contributions[i]
                if x is not None:
                    cur[pos] = combine(cur[pos], x)
            snapshot = list(map(_call, self._combine, state.previous, cur))
        else:
            snapshot = list(map(add, state.previous, cur))
        own = cur.copy()
        times, snapshots = state.times, state.snapshots
        if times and times[-1] == t:
            snapshots[-1] = snapshot
            state.owns[-1] = own
            state.ids[-1].append(source_id)
            return snapshot, own
        times.append(t)
        snapshots.append(snapshot)
        state.owns.append(own)
        state.ids.append([source_id])
        if len(times) > 2 and times[1] < horizon:
            # Keep every time from the horizon on, and the latest one before it: a late event
            # whose predecessor is that old starts from it.
            cut = len(times) - 2 if times[-2] < horizon else bisect_left(times, horizon) - 1
            del times[:cut], snapshots[:cut], state.owns[:cut], state.ids[:cut]
        return snapshot, own

    def _advance(self, state: EntityState, w: int, c: int, horizon: int) -> None:
        """Close window w's newest tile and open tile ``c`` (a later one)."""
        tile, n, o, end, exact_at, identity, recompute = self._advance_plans[w]
        old, starts, parts = state.tiles[w], state.starts[w], state.parts[w]
        cur, prev = state.current, state.previous
        lo = c - n + 1  # first tile of the new window
        if old >= 0:
            closing = cur[o:end]
            if old < lo:  # the whole old window is left behind
                for pos, j in exact_at:
                    prev[pos] = identity[j]
            elif exact_at:  # tiles [old - n + 1, lo - 1] leave, the closing tile enters
                k = bisect_left(starts, old - n + 1)
                while k < len(starts) and starts[k] < lo:
                    part = parts[k]
                    for pos, j in exact_at:
                        prev[pos] -= part[j]
                    k += 1
                for pos, j in exact_at:
                    prev[pos] += closing[j]
            starts.append(old)
            parts.append(closing)
            if state.cache is not None and state.cache.rows is not None:
                state.cache.rows[w].append(self._windows[w].row(old, closing))
        state.tiles[w] = c
        cur[o:end] = identity
        # Keep the tiles an event still within the horizon may need for its window.
        keep_from = min(horizon // tile, c) - n + 1
        if starts and starts[0] < keep_from:
            cut = bisect_left(starts, keep_from)
            del starts[:cut], parts[:cut]
            if state.cache is not None and state.cache.rows is not None:
                del state.cache.rows[w][:cut]
        if recompute:
            folded = self._windows[w].fold(starts, parts, lo, c - 1)
            for j in recompute:
                prev[o + j] = folded[j]

    def _out_of_order(
        self,
        state: EntityState,
        key: str,
        t: int,
        source_id: str,
        *,
        contributions: list[Partial],
        write_time: int,
    ) -> list[dict[str, Any]]:
        state.cache = None  # a closed tile may change: its encoded row too
        # 1. Into its tile, and into `previous` when that tile is inside the newest tile's window.
        for w, plan in enumerate(self._windows):
            own = [(j, contributions[i]) for j, i in enumerate(plan.measures) if contributions[i] is not None]
            if not own:
                continue
            c, o, starts, parts = t // plan.tile, plan.offset, state.starts[w], state.parts[w]
            if c == state.tiles[w]:
                for j, x in own:
                    state.current[o + j] = plan.combine[j](state.current[o + j], x)
                continue
            k = bisect_left(starts, c)
            if k == len(starts) or starts[k] != c:
                starts.insert(k, c)
                parts.insert(k, plan.identity.copy())
            for j, x in own:
                parts[k][j] = plan.combine[j](parts[k][j], x)
                if c > state.tiles[w] - plan.n:
                    state.previous[o + j] = plan.combine[j](state.previous[o + j], x)
        # 2. Its own values: the snapshot just before it (same tile) or the closed tiles, plus itself;
        #    its own tile's partials likewise.
        times, snapshots, owns = state.times, state.snapshots, state.owns
        pos = bisect_right(times, t)
        before = pos - 1 if pos > 0 else None
        snapshot: Snapshot = []
        own_tile: Snapshot = []
        for w, plan in enumerate(self._windows):
            c = t // plan.tile
            if before is not None and times[before] // plan.tile == c:
                snapshot.extend(snapshots[before][plan.offset : plan.end])
                own_tile.extend(owns[before][plan.offset : plan.end])
            else:
                snapshot.extend(plan.fold(state.starts[w], state.parts[w], c - plan.n + 1, c - 1))
                own_tile.extend(plan.identity)
        every = range(len(self._windows))
        self._add_to(snapshot, contributions, every)
        self._add_to(own_tile, contributions, every)
        if before is not None and times[before] == t:
            snapshots[before] = snapshot
            owns[before] = own_tile
            state.ids[before].append(source_id)
        else:
            times.insert(pos, t)
            snapshots.insert(pos, snapshot)
            owns.insert(pos, own_tile)
            state.ids.insert(pos, [source_id])
            pos += 1
        updates = [self._update(state, key, t, source_id, snapshot, own_tile, write_time)]
        if all(x is None for x in contributions):
            return updates
        # 3. Corrections: every later event time whose window reaches back to t (and, in the
        #    windows where it shares t's tile, its own tile's partials).
        for later_pos in range(pos, len(times)):
            later_t, later = times[later_pos], snapshots[later_pos]
            reached = [w for w, p in enumerate(self._windows) if t >= (later_t // p.tile - p.n + 1) * p.tile]
            if self._add_to(later, contributions, reached):
                shared = [w for w in reached if later_t // self._tile_sizes[w] == t // self._tile_sizes[w]]
                self._add_to(owns[later_pos], contributions, shared)
                updates.append(
                    self._update(state, key, later_t, source_id, later, owns[later_pos], write_time)
                )
                self.stats["corrections"] += 1
        return updates

    def _add_to(self, snapshot: Snapshot, contributions: list[Partial], windows: Iterable[int]) -> bool:
        """Combine one event's contributions into the given windows of a snapshot; True if any."""
        changed = False
        for w in windows:
            plan = self._windows[w]
            for j, i in enumerate(plan.measures):
                if contributions[i] is not None:
                    pos = plan.offset + j
                    snapshot[pos] = plan.combine[j](snapshot[pos], contributions[i])
                    changed = True
        return changed


@cache
def _aggregator(layout_id: int) -> Aggregator:
    return Aggregator(feature_set_by_layout(layout_id))


def _unpacker(tiles: bytes) -> msgpack.Unpacker:
    """An unpacker at the first element of an update's tiles (their layout id)."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(tiles)
    unpacker.read_array_header()
    return unpacker


def tiles_layout(tiles: bytes) -> int:
    """The layout id an update's tiles start with (the first element of their msgpack array)."""
    layout: int = _unpacker(tiles).unpack()
    return layout


def evaluate_tiles(tiles: bytes, at: int) -> tuple[dict[str, Any], int | None]:
    """:meth:`Aggregator.evaluate` by the definition that wrote the tiles (found by the layout id
    they carry; NotFoundError if this process has not loaded it)."""
    unpacker = _unpacker(tiles)
    return _aggregator(unpacker.unpack())._evaluate(unpacker, at)


class Evaluations:
    """Tiles evaluated at read times, each remembered until its values can next change: an entity
    read again before then (an inactive user on every request, the labels of one update) is not
    evaluated again. Bounded: past ``limit`` the oldest goes. Safe to share between threads (a
    lost race evaluates twice)."""

    def __init__(self, limit: int = 16_384) -> None:
        self.limit = limit
        # tiles -> (evaluated at, next change or None, token, values)
        self._known: dict[bytes, tuple[int, int | None, int, dict[str, Any]]] = {}
        self._tokens = itertools.count(1)

    def at(self, tiles: bytes, at: int) -> dict[str, Any]:
        """Every feature's value at ``at`` from an update's tiles (see :func:`evaluate_tiles`)."""
        return self.entry(tiles, at)[1]

    def entry(self, tiles: bytes, at: int) -> tuple[int, dict[str, Any]]:
        """:meth:`at` with a token naming this evaluation: the same token, the same values (this
        process hands each evaluation its own), so a reader may keep what it derives from them
        (a projected row, its float64 form) under the token."""
        hit = self._known.get(tiles)
        if hit is not None and hit[0] <= at and (hit[1] is None or at < hit[1]):
            return hit[2], hit[3]
        values, until = evaluate_tiles(tiles, at)
        known = self._known
        if len(known) >= self.limit:  # the oldest goes (dicts keep insertion order)
            known.pop(next(iter(known)), None)
        token = next(self._tokens)
        known[tiles] = (at, until, token, values)
        return token, values
