"""Point-in-time correct training sets: ``get_historical_features(store, labels, refs)``.

For every label row (an entity key, a label time ``t`` in epoch ms, any label columns) and
every feature set asked for, the value is the one of the feature set's update that was
*visible at t*:

* **bitemporal (default)**: an update is eligible when its ``event_time <= t`` **and** its
  ``write_time <= t`` (the platform had computed it by then); among eligible updates the
  one with the greatest ``event_time`` wins, ties going to the greatest ``write_time``
  (then to the later lake position);
* ``bitemporal=False``: only ``event_time <= t`` counts (what Feast does).

Missing (no eligible update, or the feature absent from it) is null. Values keep their type:
a long feature is an integer column with nulls (pandas ``Int64``), a boolean one boolean, a
string one strings, a double one float64 with NaN. Each update counts once: the later copies of
an ``event_id`` (a processor's replay after a crash) are left out, as everywhere the lake is read.

How it is computed
------------------
Training sets read the lake's Parquet files directly, with Arrow and numpy: in both offline
store modes the lake is what the tables hold, and a sort-merge in numpy over the few columns it
needs took a third of the CPU of ClickHouse's window and ASOF JOIN over the same files (what
this module did before; 100,000 labels x 1M updates). Per feature set:

1. the narrow columns of every file (feature set, entity, the two times) are read in parallel;
   rows of other sets, or of entities no label names, are dropped, and entities become codes;
2. copies of one update share its entity and event time (its id is derived from them), so
   only rows whose (entity, event time) repeats can be copies: their ids and ingest times are
   read to drop all but the first written copy (the lake reader's rule). Without such rows no
   id is read;
3. every update gets ``avail = max(event_time, write_time)`` -- the first label time for which
   it is eligible -- and a rank in the order of (event time, write time, lake position). Sorted
   by (entity, avail), a running maximum of the rank gives, at each update, the best update
   available no later than it: the answer for a label is the running maximum at the last
   update of its entity with ``avail <= t``, found by binary search. Without the write-time
   condition, ``avail`` is the event time;
4. the typed value columns of just the matched rows are read, file by file (each file once,
   for all feature sets), and put in label order.

Only narrow columns are sorted; the 50-wide values are read once, in step 4, where a later
per-row column (a matched update's ``valid_until`` and tiles) would be read the same way.
"""

from __future__ import annotations

import gc
import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, overload

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from batch.offline_store.base import OfflineStore
from features.engine import Evaluations
from headwater.errors import ConfigError, NotFoundError
from processors.lake.columns import feature_column
from processors.lake.layout import FileName
from processors.lake.reader import (
    FEATURE_TOPIC,
    feature_column_types,
    file_schema,
    first_copies,
    lake_files,
    open_file,
)

__all__ = ["get_historical_features", "parse_refs"]

FEATURE_TABLE = "feature_updates"
_NARROW = ["feature_set", "entity_key", "event_time", "write_time"]
_COPIES = ["event_id", "_ingest_time"]  # read only for rows that may be copies of one update
_BATCH_ROWS = 65_536
# pandas types of typed feature columns: nullable integers and booleans, not float64 with NaN.
_PANDAS_TYPES = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class _Updates:
    """The lake rows of one feature set whose entity a label names (one entry per row)."""

    place: np.ndarray  # the row's place in the lake: its file's start (see _Lake) plus its row
    code: np.ndarray  # the entity's code: its position among the labels' distinct keys
    event_time: np.ndarray
    write_time: np.ndarray

    def take(self, at: np.ndarray) -> _Updates:
        return _Updates(self.place[at], self.code[at], self.event_time[at], self.write_time[at])


@dataclass(frozen=True)
class _Lake:
    """The narrow columns of every feature-updates file, concatenated in file order."""

    files: list[Path]
    feature_set: pa.ChunkedArray  # dictionary-encoded, as in the files
    entity_key: pa.ChunkedArray
    event_time: np.ndarray
    write_time: np.ndarray
    starts: np.ndarray  # where each file's rows begin, then their total: a place is start + row

    def file_of(self, place: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, place, side="right") - 1

    def by_file(self, place: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(file, the positions in ``place`` of its rows, in row order) for each file with some."""
        order = np.argsort(place)
        bounds = np.searchsorted(place[order], self.starts)
        return [(f, order[a:b]) for f, (a, b) in enumerate(itertools.pairwise(bounds)) if b > a]


def _parallel(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    # Parquet decoding releases the GIL: files are read on every core, in order.
    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 2) or 1) as pool:
        return list(pool.map(fn, items))


def _read_lake(files: list[Path]) -> _Lake:
    tables = _parallel(
        lambda path: open_file(path, read_dictionary=["feature_set"]).read(
            columns=_NARROW, use_threads=False
        ),
        files,
    )
    sizes = np.array([t.num_rows for t in tables], dtype=np.int64)
    n = int(sizes.sum())

    def joined(name: str) -> pa.ChunkedArray:
        return pa.chunked_array(
            [c for t in tables for c in t.column(name).chunks], tables[0].schema.field(name).type
        )

    def ints(name: str) -> np.ndarray:
        return np.asarray(joined(name).to_numpy(), dtype=np.int64) if n else np.zeros(0, np.int64)

    starts = np.concatenate([[0], np.cumsum(sizes)])
    return _Lake(
        files, joined("feature_set"), joined("entity_key"), ints("event_time"), ints("write_time"), starts
    )


def _updates(lake: _Lake, feature_set: str, keys: pa.Array) -> _Updates:
    """The rows of ``feature_set`` for the entities in ``keys`` (their codes: positions in keys)."""
    chunks = [
        pc.equal(c.dictionary, feature_set).to_numpy(zero_copy_only=False)[c.indices.to_numpy()]
        for c in lake.feature_set.chunks
    ]
    mine = np.concatenate(chunks) if chunks else np.zeros(0, dtype=bool)
    at = None if mine.all() else np.flatnonzero(mine)  # a lake of one feature set: no copy
    entities = lake.entity_key if at is None else lake.entity_key.take(pa.array(at))
    code = pc.fill_null(pc.index_in(entities, value_set=keys), -1).to_numpy().astype(np.int64)
    known = np.flatnonzero(code >= 0)
    at = known if at is None else at[known]
    return _Updates(at, code[known], lake.event_time[at], lake.write_time[at])


def _order(u: _Updates, lake: _Lake) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``u`` sorted by (event time, write time, lake position), and the positions of
    later copies of an update (same event id) to leave out.

    One sort on the event time. Only rows of one entity are ever compared, so the order matters
    only among rows sharing both entity and event time: just those have their id and ingest time
    read (the only columns read beyond the narrow ones) and are put in full order.
    """
    order = np.argsort(u.event_time, kind="stable")  # timsort: the lake is nearly in time order
    times = u.event_time[order]
    tied = np.flatnonzero(times[1:] == times[:-1])
    none = np.zeros(0, dtype=np.int64)
    if not len(tied):
        return order, none
    rows = order[np.union1d(tied, tied + 1)]
    rows = rows[np.lexsort((u.event_time[rows], u.code[rows]))]
    same = np.flatnonzero(
        (u.code[rows][1:] == u.code[rows][:-1]) & (u.event_time[rows][1:] == u.event_time[rows][:-1])
    )
    if not len(same):
        return order, none
    suspects = np.unique(rows[np.union1d(same, same + 1)])
    ids, ingest = _read_rows(lake, u.place[suspects], _COPIES)
    partition, offset = _positions(lake, u.place[suspects])
    keep = first_copies(ids, np.asarray(ingest.to_numpy(), dtype=np.int64), partition, offset)
    where = np.empty(len(order), dtype=np.int64)
    where[order] = np.arange(len(order))
    at = np.sort(where[suspects])
    order[at] = suspects[np.lexsort((offset, partition, u.write_time[suspects], u.event_time[suspects]))]
    later: np.ndarray = suspects[~keep]
    return order, later


def _positions(lake: _Lake, place: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(partition, a stand-in for the lake offset) of rows that share an event time, from file names.

    Such rows are in one date folder (named by the event time's day), where the files of a
    partition hold disjoint offset ranges and each file's rows are in offset order: the file's
    first offset plus the row's position orders them as their offsets do, without reading them.
    """
    file = lake.file_of(place)
    names = np.zeros((len(lake.files), 2), dtype=np.int64)
    for f in np.unique(file):
        name = FileName.parse(lake.files[f].name)  # lake_files lists only names that parse
        assert name is not None
        names[f] = name.partition, name.first
    return names[file, 0], names[file, 1] + place - lake.starts[file]


def _read_rows(lake: _Lake, place: np.ndarray, columns: list[str]) -> list[pa.Array]:
    """``columns`` of the rows at each place, in the given order."""
    groups = lake.by_file(place)

    def read(group: tuple[int, np.ndarray]) -> pa.Table:
        f, at = group
        path = lake.files[f]
        schema = pa.schema([file_schema(path).field(c) for c in columns])
        return pa.Table.from_batches(
            _take_rows(path, columns, [place[at] - lake.starts[f]])[0], schema=schema
        )

    table = pa.concat_tables(_parallel(read, groups), promote_options="default")
    table = table.take(pa.array(np.argsort(np.concatenate([at for _, at in groups]))))
    return [table.column(name).combine_chunks() for name in columns]


def _match(u: _Updates, lake: _Lake, codes: np.ndarray, times: np.ndarray, bitemporal: bool) -> np.ndarray:
    """Per label (entity code, time), the position in ``u`` of its update, or -1 (module docstring)."""
    found = np.full(len(codes), -1, dtype=np.int64)
    if not len(u.code):
        return found
    order, later = _order(u, lake)
    n = len(order)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    avail = np.maximum(u.event_time, u.write_time) if bitemporal else u.event_time
    usable = avail <= times[codes >= 0].max(initial=np.iinfo(np.int64).min)
    usable[later] = False
    at = np.flatnonzero(usable)
    if not len(at):
        return found
    at = at[_by_entity(u.code[at], avail[at])]
    code = u.code[at]
    update_key, label_key = _keys(code, avail[at], codes, times)
    # Codes ascend along ``at``, so a running maximum of code * n + rank stays within each entity.
    best = np.maximum.accumulate(code * n + rank[at])
    asked = np.argsort(label_key)  # sorted queries: the binary searches walk memory in order
    last = np.empty(len(codes), dtype=np.int64)
    last[asked] = np.searchsorted(update_key, label_key[asked], side="right") - 1
    hit = (codes >= 0) & (last >= 0)
    hit[hit] = code[last[hit]] == codes[hit]
    found[hit] = order[best[last[hit]] - codes[hit] * n]
    return found


def _by_entity(code: np.ndarray, avail: np.ndarray) -> np.ndarray:
    """The positions that sort (code, avail): a stable sort on avail, then stable radix passes on
    the code's 16-bit digits. The lake is nearly in write-time order, so the first sort is
    almost free, and numpy sorts 16-bit keys by radix: a quarter of one sort on packed keys."""
    order = np.argsort(avail, kind="stable")
    for shift in range(0, max(int(code.max(initial=0)), 1).bit_length(), 16):
        digits = ((code[order] >> shift) & 0xFFFF).astype(np.uint16)
        order = order[np.argsort(digits, kind="stable")]
    return order


def _keys(
    code: np.ndarray, avail: np.ndarray, codes: np.ndarray, times: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One int64 per (entity, time) for the updates and the labels, ordered as the pairs are
    (``code`` and ``avail`` come sorted by entity, then time).

    Times relative to the earliest update, times the number of entities, fit in 63 bits for any
    realistic span; otherwise the times are replaced by their ranks among all of them.
    """
    low = int(avail.min())
    high = max(int(avail.max()), int(times.max(initial=low)))
    span = high - low + 2
    entities = int(codes.max(initial=0)) + 1
    if span < 2**62 // entities:
        clipped = np.clip(times, low - 1, high) - (low - 1)  # a label before every update: slot 0
        return code * span + (avail - (low - 1)), np.where(codes >= 0, codes, 0) * span + clipped
    ranks = np.unique(np.concatenate([avail, times]), return_inverse=True)[1]
    span = int(ranks.max()) + 1
    return code * span + ranks[: len(avail)], np.where(codes >= 0, codes, 0) * span + ranks[len(avail) :]


def _values(
    lake: _Lake,
    types: Mapping[str, pa.DataType],
    wanted: Mapping[str, list[str]],
    matches: Mapping[str, tuple[np.ndarray, _Updates]],
    n_labels: int,
) -> dict[str, pa.ChunkedArray]:
    """Each wanted column in label order: ``matches[fs]`` is (label positions, their updates).

    Each file is read once, for every feature set with rows in it, on every core.
    """
    needs: dict[int, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for fs, (labels, u) in matches.items():
        for f, mine in lake.by_file(u.place):
            needs.setdefault(f, []).append((fs, labels[mine], u.place[mine] - lake.starts[f]))

    def read(
        item: tuple[int, list[tuple[str, np.ndarray, np.ndarray]]],
    ) -> list[tuple[str, np.ndarray, pa.Table]]:
        f, parts = item
        present = file_schema(lake.files[f])
        columns = sorted({c for fs, _, _ in parts for c in wanted[fs] if c in present.names})
        taken = _take_rows(lake.files[f], columns, [rows for _, _, rows in parts])
        schema = pa.schema([present.field(c) for c in columns])
        return [
            (
                fs,
                labels,
                pa.Table.from_batches(batches, schema=schema).select([c for c in wanted[fs] if c in columns]),
            )
            for (fs, labels, _), batches in zip(parts, taken, strict=True)
        ]

    pieces: dict[str, list[tuple[np.ndarray, pa.Table]]] = {fs: [] for fs in wanted}
    for found in _parallel(read, sorted(needs.items())):
        for fs, labels, values in found:
            pieces[fs].append((labels, values))
    out: dict[str, pa.ChunkedArray] = {}
    for fs, parts in pieces.items():
        if not parts:
            out.update((c, pa.chunked_array([pa.nulls(n_labels, types[c])])) for c in wanted[fs])
            continue
        # Files typed a feature differently, or lack it: the unified type, nulls where missing.
        values = pa.concat_tables([_widened(v, types) for _, v in parts], promote_options="default")
        source = np.full(n_labels, -1, dtype=np.int64)
        source[np.concatenate([labels for labels, _ in parts])] = np.arange(values.num_rows)
        placed = values.take(pa.array(source, mask=source < 0))
        for c in wanted[fs]:
            out[c] = (
                placed.column(c)
                if c in placed.column_names
                else pa.chunked_array([pa.nulls(n_labels, types[c])])
            )
    return out


def _take_rows(path: Path, columns: list[str], wanted: list[np.ndarray]) -> list[list[pa.RecordBatch]]:
    """For each array of (sorted) positions in ``wanted``, the batches of those rows of ``columns``.

    Read a batch at a time through a memory map: the buffers of one batch are reused for the
    next, where reading the whole file would allocate (and the kernel zero) fresh pages for all
    of it -- a quarter less CPU for 50 double columns.
    """
    reader = open_file(path)
    taken: list[list[pa.RecordBatch]] = [[] for _ in wanted]
    start = 0
    for batch in reader.iter_batches(batch_size=_BATCH_ROWS, columns=columns, use_threads=False):
        end = start + batch.num_rows
        for out, rows in zip(taken, wanted, strict=True):
            lo, hi = np.searchsorted(rows, [start, end])
            if hi > lo:
                out.append(batch.take(pa.array((rows[lo:hi] - start).astype(np.uint32))))
        start = end
    return taken


def _widened(table: pa.Table, types: Mapping[str, pa.DataType]) -> pa.Table:
    """``table`` with each column in its unified type (most files need no change)."""
    for i, field in enumerate(table.schema):
        if field.type != types[field.name]:
            table = table.set_column(
                i, field.with_type(types[field.name]), table.column(i).cast(types[field.name])
            )
    return table


def _to_ms(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_timestamp(column.type):
        return pc.cast(pc.cast(column, pa.timestamp("ms", tz=column.type.tz)), pa.int64())
    if pa.types.is_integer(column.type):
        return pc.cast(column, pa.int64())
    raise ConfigError(f"label times must be epoch milliseconds or timestamps, not {column.type}")


def _at_label_times(
    lake: _Lake,
    fs: str,
    features: list[str],
    match: tuple[np.ndarray, _Updates],
    *,
    times: np.ndarray,
    values: dict[str, pa.ChunkedArray],
) -> None:
    """Windows read at each label's time: where a label comes at or after its matched update's
    ``valid_until`` (a tile has left a window since), the update's tiles evaluated at the label
    time replace its stored values in ``values`` (in place), as an online read then would.
    Updates without tiles (before read-time windows, or not windowed) keep their values."""
    extra = {"valid_until": pa.int64(), "tiles": pa.binary()}
    got = _values(lake, extra, {fs: list(extra)}, {fs: match}, len(times))
    until = got["valid_until"]
    if until.null_count == len(until):
        return
    due = pc.fill_null(pc.greater_equal(pa.array(times), until), False).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(due)
    if not len(rows):
        return
    evaluations = Evaluations(limit=len(rows))
    blobs = got["tiles"].take(pa.array(rows)).to_pylist()
    with _collector_paused():
        read = [evaluations.at(blob, int(t)) for blob, t in zip(blobs, times[rows].tolist(), strict=True)]
        # Rows of the requested values (C-level gets), turned into columns by one transpose.
        columns = list(zip(*[tuple(map(r.get, features)) for r in read], strict=True))
    mask = pa.array(due)
    for f, evaluated in zip(features, columns, strict=True):
        column = feature_column(fs, f)
        current = values[column].combine_chunks()
        replacements = pa.array(evaluated, current.type)
        values[column] = pa.chunked_array([pc.replace_with_mask(current, mask, replacements)])


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic collector off meanwhile: the evaluations create millions of small objects,
    none of them cyclic, and each full collection walks them all again (it more than tripled the
    time of building the columns of 100,000 labels x 50 features)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def parse_refs(feature_refs: Sequence[str]) -> dict[str, list[str]]:
    """``["fs:a", "fs:b", "gs:c"]`` -> ``{"fs": ["a", "b"], "gs": ["c"]}``, in order, checked."""
    out: dict[str, list[str]] = {}
    for ref in feature_refs:
        fs, sep, feature = ref.partition(":")
        if not sep or not fs or not feature or ":" in feature:
            raise ConfigError(f"feature reference {ref!r} is not '<feature_set>:<feature>'")
        if feature not in out.setdefault(fs, []):
            out[fs].append(feature)
    if not out:
        raise ConfigError("no feature references given")
    return out


def _known(types: Mapping[str, pa.DataType], sets: Mapping[str, list[str]]) -> None:
    unknown = [
        feature_column(fs, f) for fs, fl in sets.items() for f in fl if feature_column(fs, f) not in types
    ]
    if unknown:
        known = sorted(types)
        raise NotFoundError(
            f"unknown feature refs {', '.join(unknown)}: no update in the offline store has them; "
            f"known: {', '.join(known[:50]) or 'none (the lake has no feature updates yet)'}"
            + (" ..." if len(known) > 50 else "")
        )


@overload
def get_historical_features(
    store: OfflineStore,
    labels: pd.DataFrame,
    feature_refs: Sequence[str],
    *,
    bitemporal: bool = ...,
    entity_column: str = ...,
    time_column: str = ...,
    entity_columns: Mapping[str, str] | None = ...,
    full_names: bool = ...,
    include_timestamps: bool = ...,
) -> pd.DataFrame: ...


@overload
def get_historical_features(
    store: OfflineStore,
    labels: pa.Table,
    feature_refs: Sequence[str],
    *,
    bitemporal: bool = ...,
    entity_column: str = ...,
    time_column: str = ...,
    entity_columns: Mapping[str, str] | None = ...,
    full_names: bool = ...,
    include_timestamps: bool = ...,
) -> pa.Table: ...


def get_historical_features(
    store: OfflineStore,
    labels: pd.DataFrame | pa.Table,
    feature_refs: Sequence[str],
    *,
    bitemporal: bool = True,
    entity_column: str = "entity_key",
    time_column: str = "label_time",
    entity_columns: Mapping[str, str] | None = None,
    full_names: bool = True,
    include_timestamps: bool = False,
) -> pd.DataFrame | pa.Table:
    """The label rows, in their order, with one column per feature ref, point-in-time correct.

    ``entity_columns`` maps a feature set to the label column holding its entity key (e.g.
    ``{"item_activity": "item_id"}``); others use ``entity_column``. Feature columns are named
    by the ref (``"user_activity:clicks_1h"``), or by the bare feature name when
    ``full_names=False``. ``include_timestamps`` adds ``<feature_set>:event_time`` and
    ``<feature_set>:write_time`` of the update each value came from. Returns a DataFrame
    for a DataFrame and an Arrow table for an Arrow table.
    """
    sets = parse_refs(feature_refs)
    table = pa.Table.from_pandas(labels, preserve_index=False) if isinstance(labels, pd.DataFrame) else labels
    ent_of = {fs: (entity_columns or {}).get(fs, entity_column) for fs in sets}
    for col in {time_column, *ent_of.values()}:
        if col not in table.column_names:
            raise ConfigError(f"labels have no column {col!r}; columns: {', '.join(table.column_names)}")
    files = lake_files(store.lake, FEATURE_TOPIC)
    types = feature_column_types(store.lake, files)
    _known(types, sets)
    out_names = {
        feature_column(fs, f): feature_column(fs, f) if full_names else f
        for fs, fl in sets.items()
        for f in fl
    }
    if len(set(out_names.values())) < len(out_names) or set(out_names.values()) & set(table.column_names):
        raise ConfigError(
            f"feature columns clash with each other or with label columns: {sorted(out_names.values())}"
        )

    label_times = _to_ms(table.column(time_column))
    times = pc.fill_null(label_times, 0).to_numpy()
    timed = pc.is_valid(label_times).to_numpy()
    lake = _read_lake(files)  # there are files: the refs were found in them
    matches: dict[str, tuple[np.ndarray, _Updates]] = {}
    columns: dict[str, pa.Array] = {}
    for fs in sets:
        keys_column = pc.cast(table.column(ent_of[fs]), pa.string())
        keys = pc.unique(keys_column.drop_null())
        codes = pc.fill_null(pc.index_in(keys_column, value_set=keys), -1).to_numpy().astype(np.int64)
        codes[~timed] = -1
        u = _updates(lake, fs, keys)
        found = _match(u, lake, codes, times, bitemporal)
        hit = np.flatnonzero(found >= 0)
        matches[fs] = (hit, u.take(found[hit]))
        if include_timestamps:
            for name in ("event_time", "write_time"):
                at = np.zeros(len(codes), dtype=np.int64)
                at[hit] = getattr(u, name)[found[hit]]
                columns[f"{fs}:{name}"] = pa.array(at, mask=found < 0)
    wanted = {fs: [feature_column(fs, f) for f in fl] for fs, fl in sets.items()}
    values = _values(lake, types, wanted, matches, table.num_rows)
    for fs, fl in sets.items():
        _at_label_times(lake, fs, fl, matches[fs], times=times, values=values)
    ordered: dict[str, pa.Array | pa.ChunkedArray] = {}
    for fs, refs in wanted.items():
        ordered.update((out_names[ref], values[ref]) for ref in refs)
        if include_timestamps:
            ordered.update((f"{fs}:{n}", columns[f"{fs}:{n}"]) for n in ("event_time", "write_time"))
    features = pa.table(ordered)
    if isinstance(labels, pd.DataFrame):
        frame = features.to_pandas(types_mapper=_PANDAS_TYPES.get)
        frame.index = labels.index
        return pd.concat([labels, frame], axis=1)
    for field, column in zip(features.schema, features.columns, strict=True):
        table = table.append_column(field, column)
    return table
