"""Window semantics of every windowed feature: written down once, here.

The streaming engine (:mod:`features.engine`, run by the Faust processor and the Flink
job) calls these functions; the ClickHouse compiler (:mod:`features.sql`) mirrors each of
them in one named SQL expression. A parity test holds the two to the same numbers.

Times are epoch milliseconds, UTC, and never negative (an event before 1970 is rejected).

**Tiles.** Each window length W is cut into tiles of a fixed size ``tile_ms(W)``: the
largest of 1 s, 5 s, 10 s, 30 s, 1 min, 5 min, 10 min, 30 min, 1 h, 1 d that divides W into
at least 60 tiles (5m → 5 s, 1h → 1 min, 24h → 10 min, 7d → 1 h); a short window that no
size divides 60 times (e.g. 30s) gets 1 s tiles. Tile ``k`` holds the events with
``k * tile <= event_time < (k + 1) * tile``: ``tile_index(t, tile) = t // tile``.

**Boundaries.** The value of a window W at time t aggregates the entity's events whose
event time lies in ``[window_start(t, W), t]`` with
``window_start(t, W) = (t // tile - n + 1) * tile`` and ``n = W / tile``: the n - 1 whole
tiles before t's tile, plus t's own tile up to and including t. The start hops by one tile,
the end is exact. So the window spans between ``W - tile`` and ``W`` (at most 1/60 short),
never reaches past t (no future leaks into a training row), and the state an engine keeps
is one partial aggregate per tile instead of every event. An event exactly at
``window_start`` is inside; one a millisecond earlier is not. All events at exactly t count,
whatever their arrival order: the value is a function of the event time, not of arrival.

**Updates.** Every accepted source event emits one update for its entity carrying the
values at its own event time. Events sharing an entity and an event time therefore emit
several updates for that time; the last one emitted holds all of them (newer-wins keeps it,
as does compaction of the ``feature-updates`` topic).

**Read time.** A window's value is defined at any time t, not only at event times: the
entity's events in ``[window_start(t, W), t]``. Between events it changes as tiles leave the
window, and long after the last event every window is empty (counts 0, others null). Each
update gives the values at its event time with the tiles they came from, and ``valid_until``,
the first time a non-empty tile leaves a window; readers (the online store, training sets)
evaluate later times from the tiles. A reader at a time before the update's event time reads
it as of that time.

**Lateness and watermarks.** Each feature set has an allowed lateness L (default 1 min).
Each input partition's *watermark* is the largest event time accepted from it so far. An
event is *too late* when ``event_time < watermark - L`` for the watermark of its own
partition as it was before the event (:func:`is_too_late`); an event exactly L behind is
still accepted. Judged per partition, lateness depends only on what that partition delivered
before the event, never on how far other partitions (or a backlog fetched in another
interleaving) have got, so live processing, a backlog and a restart reject the same events.
A too-late event changes nothing and is rejected with reason ``too_late``; the processor
sends it to ``dead-letters`` (so it is visible and replayable) and the backfill, which sees
complete data, counts it. An out-of-order event within L is aggregated as if it had come in
order: it gets its own update at its event time, and every later event time of that entity
that its windows reach gets a *correction* update (ascending, ending at the entity's latest
time), so the last update per (entity, event time) always equals the backfill's value, and
the latest update per entity is the entity's current value. The smallest watermark over the
partitions, minus L, is the state's horizon: nothing older can be accepted, so no state older
is kept. A partition that delivers nothing for a while (``processors.idle_partition_s``) stops
holding the horizon back; events it brings later below the horizon are too late.

**Duplicates and the future.** An event whose ``event_id`` was already accepted (a client's
retry) is rejected with reason ``duplicate`` and counts once; the backfill counts each id
once too. An event dated more than a skew (``processors.future_skew_s``, default 5 min) ahead
of the time of processing is rejected with reason ``future`` and moves no watermark.

**Approximate distinct count.** Linear counting over ``m = 1024`` buckets: a value falls
in bucket ``xxHash64(canonical string) % m`` (``xxhash.xxh64_intdigest`` in Python,
``xxHash64(toString(x))`` in ClickHouse; strings as UTF-8, integers in decimal). With B
buckets hit the estimate is ``round(-m * ln(1 - B / m))``, B capped at m - 1 (the
estimate saturates at 7,098). Exact for small counts, a few percent off at thousands,
and bit-identical in both engines (a test checks every B).
"""

from __future__ import annotations

import math
import re

import xxhash

from headwater.errors import ConfigError

__all__ = [
    "DISTINCT_BUCKETS",
    "TILE_SIZES_MS",
    "distinct_bucket",
    "distinct_estimate",
    "format_duration",
    "is_too_late",
    "parse_duration",
    "tile_index",
    "tile_ms",
    "tiles_per_window",
    "window_start",
]

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
_UNITS = {"s": SECOND, "m": MINUTE, "h": HOUR, "d": DAY}
_DURATION_RE = re.compile(r"^([1-9][0-9]*)([smhd])$")

TILE_SIZES_MS: tuple[int, ...] = (
    SECOND,
    5 * SECOND,
    10 * SECOND,
    30 * SECOND,
    MINUTE,
    5 * MINUTE,
    10 * MINUTE,
    30 * MINUTE,
    HOUR,
    DAY,
)
MIN_TILES_PER_WINDOW = 60
DISTINCT_BUCKETS = 1024


def parse_duration(text: str, what: str = "duration") -> int:
    """``"5m"`` → 300000 ms. Units s, m, h, d; a positive whole number of them."""
    match = _DURATION_RE.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(
            f"bad {what} {text!r}: write a positive whole number and a unit s, m, h or d, "
            "e.g. '5m', '24h', '7d'"
        )
    return int(match[1]) * _UNITS[match[2]]


def format_duration(ms: int) -> str:
    """The shortest spelling of a whole number of seconds: 86400000 → ``"1d"``."""
    for unit in ("d", "h", "m", "s"):
        if ms % _UNITS[unit] == 0:
            return f"{ms // _UNITS[unit]}{unit}"
    raise ConfigError(f"{ms} ms is not a whole number of seconds")


def tile_ms(window_ms: int) -> int:
    """Tile size of a window: the largest standard size cutting it into >= 60 tiles."""
    dividing = [t for t in TILE_SIZES_MS if window_ms % t == 0]
    if not dividing:
        raise ConfigError(f"window of {window_ms} ms is not a whole number of seconds")
    fine = [t for t in dividing if window_ms // t >= MIN_TILES_PER_WINDOW]
    return max(fine) if fine else min(dividing)


def tiles_per_window(window_ms: int) -> int:
    return window_ms // tile_ms(window_ms)


def tile_index(t: int, tile: int) -> int:
    return t // tile


def window_start(t: int, window_ms: int) -> int:
    """First event time (inclusive) inside the window ending at t; the end t is inclusive too."""
    tile = tile_ms(window_ms)
    return (t // tile - window_ms // tile + 1) * tile


def is_too_late(t: int, watermark: int | None, lateness_ms: int) -> bool:
    """An event at t is too late for its partition's watermark (None: nothing delivered yet)."""
    return watermark is not None and t < watermark - lateness_ms


def distinct_bucket(value: str | int) -> int:
    """Bucket of one value in the distinct-count sketch (same as ClickHouse ``xxHash64(toString(v)) % m``)."""
    text = value if isinstance(value, str) else str(int(value))
    return xxhash.xxh64_intdigest(text.encode()) % DISTINCT_BUCKETS


def distinct_estimate(buckets_hit: int) -> int:
    """Linear-counting estimate of the number of distinct values from the number of buckets hit."""
    b = min(buckets_hit, DISTINCT_BUCKETS - 1)
    return round(-DISTINCT_BUCKETS * math.log(1 - b / DISTINCT_BUCKETS))
