"""Window tiles for rows the ClickHouse backfill computed: the bytes the stream writes, row by row.

A backfilled value, like a streamed one, must be readable at any later time, so each
backfilled row carries its entity's tiles too (see :mod:`features.engine` for what they are).
ClickHouse computes their parts (:func:`features.sql.tiles_sql`: every tile's partials;
``backfill_sql(..., own=True)``: each row's own tile up to the row's time); this module turns
them into the engine's partials and encodes them with the engine's own encoder, so a
backfilled row's tiles equal those of the stream's update at the same time when events came
in order (a parity test holds them to it; a float sum over events of one millisecond may differ
in its last bits, as the values do).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from features.definitions import FeatureSet
from features.engine import Aggregator, Partial, TileCache
from features.sql import own_columns, tile_columns

__all__ = ["backfill_tiles"]

Convert = Callable[[Sequence[Any]], Partial]


def _converter(kind: str) -> Convert:
    """SQL columns of one measure's partial -> the engine's form of it."""
    if kind == "last":  # (candidates, (time, id, value)); Arrow gives a tuple as a dict

        def latest(c: Sequence[Any]) -> Partial:
            if not c[0]:
                return None
            return list(c[1].values()) if isinstance(c[1], dict) else list(c[1])

        return latest
    if kind == "distinct":  # the buckets hit -> the sketch's bit mask

        def mask(c: Sequence[Any]) -> int:
            bits = 0
            for bucket in c[0]:
                bits |= 1 << bucket
            return bits

        return mask
    return lambda c: c[0]


def _measure_kinds(aggregator: Aggregator) -> list[list[str]]:
    return [[aggregator.measures[i].kind for i in plan.measures] for plan in aggregator.plans]


def backfill_tiles(
    feature_set: FeatureSet, rows: pa.Table, tiles: Sequence[pa.Table]
) -> tuple[list[bytes], list[int]]:
    """The tiles and ``valid_until`` of every row of ``rows`` (``backfill_sql(..., own=True)``'s
    result, any order), from ``tiles`` (``tiles_sql`` of every window, in window order)."""
    aggregator = Aggregator(feature_set)
    kinds = _measure_kinds(aggregator)
    converters = [[_converter(k) for k in window] for window in kinds]
    closed: list[dict[str, tuple[list[int], list[list[Partial]]]]] = []
    for w, (table, names) in enumerate(zip(tiles, tile_columns(feature_set), strict=True)):
        by_entity: dict[str, tuple[list[int], list[list[Partial]]]] = {}
        columns = [[table.column(c).to_pylist() for c in measure] for measure in names]
        measures = list(zip(converters[w], columns, strict=True))
        for r, (key, index) in enumerate(
            zip(table.column("entity_key").to_pylist(), table.column("tile").to_pylist(), strict=True)
        ):
            starts, parts = by_entity.setdefault(key, ([], []))
            starts.append(index)
            parts.append([convert([col[r] for col in cols]) for convert, cols in measures])
        closed.append(by_entity)
    own = [
        (convert, [rows.column(c).to_pylist() for c in measure])
        for w, window in enumerate(own_columns(feature_set))
        for convert, measure in zip(converters[w], window, strict=True)
    ]
    empty: tuple[list[int], list[list[Partial]]] = ([], [])
    caches: dict[str, TileCache] = {}
    out_tiles: list[bytes] = []
    out_valid: list[int] = []
    keys, times = rows.column("entity_key").to_pylist(), rows.column("event_time").to_pylist()
    for r, (key, t) in enumerate(zip(keys, times, strict=True)):
        mine = [window.get(key, empty) for window in closed]
        own_partials = [convert([col[r] for col in cols]) for convert, cols in own]
        blob, valid_until = aggregator.encode_tiles(
            [m[0] for m in mine],
            [m[1] for m in mine],
            int(t),
            own_partials,
            caches.setdefault(key, TileCache()),
        )
        out_tiles.append(blob)
        out_valid.append(valid_until)
    return out_tiles, out_valid
