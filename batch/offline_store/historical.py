"""Point-in-time correct training sets: ``get_historical_features(store, labels, refs)``.

For every label row (an entity key, a label time ``t`` in epoch ms, any label columns) and
every feature set asked for, the value is the one of the feature set's update that was
*visible at t*:

* **bitemporal (default)**: an update is eligible when its ``event_time <= t`` **and** its
  ``write_time <= t`` (the platform had computed it by then); among eligible updates the
  one with the greatest ``event_time`` wins, ties going to the greatest ``write_time``
  (then to the later lake offset);
* ``bitemporal=False``: only ``event_time <= t`` counts (what Feast does).

Missing (no eligible update, or the feature absent from it) is NULL.

How it is computed, and why a plain ASOF JOIN on event time is not enough: ClickHouse's
ASOF JOIN finds, per key, the row with the greatest value of *one* column ``<= t``. With two
conditions, the greatest event time among rows with ``write_time <= t`` is not the answer
of an ASOF on either column: a backfill written late with an old event time would win an
ASOF on write time, and an update written after ``t`` would win one on event time. So,
per (feature set, entity):

1. every update gets ``avail = greatest(event_time, write_time)`` -- the first label time
   for which it is eligible;
2. a window over the updates in ``avail`` order keeps only the *records*: the updates whose
   ``(event_time, write_time, offset)`` is the maximum of all updates available no later
   than themselves. An update that is not a record can never be the answer: by the time it
   is eligible, a better one already is. Records increase in both ``avail`` and the ordering
   key, so the latest record with ``avail <= t`` is exactly the best eligible update;
3. ``ASOF LEFT JOIN`` of the labels to the records on ``entity_key`` and ``t >= avail`` -- one
   join for all feature sets -- gives, per label and feature set, the lake row id of the value;
4. one scan of the lake, semi-joined to those row ids, reads the typed
   ``<feature_set>:<feature>`` columns of just those rows.

Without the write-time condition, eligibility (``event_time <= t``) is monotone in event
time itself, so step 2 becomes a GROUP BY (entity, event time) keeping the greatest
(write time, offset), and the ASOF runs on event time.

Only narrow columns (key, two times, row id) are sorted and joined; the 50-wide values are
read once, in step 4. Feature rows of entities without labels, or available only after the
last label, are skipped before the window.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import overload

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from batch.offline_store.base import OfflineStore
from headwater.errors import ConfigError, NotFoundError

__all__ = ["get_historical_features", "parse_refs"]

FEATURE_TABLE = "feature_updates"
# A lake row's id: partition in the high bits, lake offset (< 2^40) in the low ones.
_ROW_ID = "(toUInt64(_partition) * 1099511627776 + toUInt64(_offset))"


def _u64(column: str) -> str:
    # Int64 -> UInt64 preserving order (flip the sign bit), so negative times sort right.
    return f"bitXor(reinterpretAsUInt64({column}), 9223372036854775808)"


# (event_time, write_time, row id) as one UInt256: cheaper to compare than a tuple.
_ORDER_KEY = (
    f"bitShiftLeft(toUInt256({_u64('event_time')}), 128) + bitShiftLeft(toUInt256({_u64('write_time')}), 64)"
    f" + toUInt256({_ROW_ID})"
)


def _feature_columns(store: OfflineStore, sets: Mapping[str, list[str]]) -> dict[str, str]:
    """ClickHouse type of each ref's column; NotFoundError listing the known refs otherwise."""
    available = store.extra_columns(FEATURE_TABLE)
    wanted = {f"{fs}:{f}": available.get(f"{fs}:{f}") for fs, fl in sets.items() for f in fl}
    unknown = [ref for ref, type_ in wanted.items() if type_ is None]
    if unknown:
        known = sorted(n for n in available if ":" in n)
        raise NotFoundError(
            f"unknown feature refs {', '.join(unknown)}: no update in the offline store has them; "
            f"known: {', '.join(known[:50]) or 'none (the lake has no feature updates yet)'}"
            + (" ..." if len(known) > 50 else "")
        )
    return {ref: type_ for ref, type_ in wanted.items() if type_ is not None}


def _records_sql(bitemporal: bool, source: str, i: int, keys: str, labels: str) -> tuple[str, str]:
    """The right side of feature set ``i``'s ASOF JOIN, and the label-side value it is compared with.

    Bitemporal: the records (see the module docstring), ASOF on ``avail``. Event time only:
    eligibility (``event_time <= t``) is monotone in event time itself, so no window is
    needed: per (entity, event time) the update with the greatest (write time, row id), and
    the ASOF on event time.
    """
    where = f"""feature_set = {{fs{i}:String}} AND entity_key IN {keys}
                AND AVAIL <= (SELECT max(_hw_t) FROM {labels})"""
    if not bitemporal:
        tie_break = f"bitShiftLeft(toUInt128({_u64('write_time')}), 64) + toUInt128({_ROW_ID})"
        records = f"""SELECT entity_key, event_time AS avail, argMax({_ROW_ID}, {tie_break}) AS rid
                      FROM {source} WHERE {where.replace("AVAIL", "event_time")}
                      GROUP BY entity_key, event_time"""
        return records, "l._hw_t"
    avail = "greatest(event_time, write_time)"
    records = f"""
        SELECT entity_key, avail, rid FROM (
            SELECT entity_key, {avail} AS avail, {_ROW_ID} AS rid, {_ORDER_KEY} AS k,
                   max(k) OVER (PARTITION BY cityHash64(entity_key), entity_key ORDER BY avail
                                RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS best
            FROM {source} WHERE {where.replace("AVAIL", avail)}
        ) WHERE k = best"""
    return records, "l._hw_t"


def _attach(labels: pd.DataFrame | pa.Table, table: pa.Table, features: pa.Table) -> pd.DataFrame | pa.Table:
    """The label rows with the feature columns appended, in the type the caller gave."""
    if features.num_rows != table.num_rows:
        raise AssertionError(f"{features.num_rows} feature rows for {table.num_rows} labels")
    if isinstance(labels, pd.DataFrame):
        frame = features.to_pandas()
        frame.index = labels.index
        return pd.concat([labels, frame], axis=1)
    for field, column in zip(features.schema, features.columns, strict=True):
        table = table.append_column(field, column)
    return table


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


def _ident(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _to_ms(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_timestamp(column.type):
        return pc.cast(pc.cast(column, pa.timestamp("ms", tz=column.type.tz)), pa.int64())
    if pa.types.is_integer(column.type):
        return pc.cast(column, pa.int64())
    raise ConfigError(f"label times must be epoch milliseconds or timestamps, not {column.type}")


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
    wanted = _feature_columns(store, sets)
    out_names = {ref: ref if full_names else ref.split(":", 1)[1] for ref in wanted}
    clash = (len(set(out_names.values())) < len(out_names)) or (
        set(out_names.values()) & set(table.column_names)
    )
    if clash:
        raise ConfigError(
            f"feature columns clash with each other or with label columns: {sorted(out_names.values())}"
        )

    tag = uuid.uuid4().hex[:10]
    # Only the join keys go to the engine; label columns stay here and are put back at the end.
    ent_cols = sorted(set(ent_of.values()))
    staged = pa.table(
        {
            "_hw_row": pa.array(range(table.num_rows), pa.uint64()),
            "_hw_t": _to_ms(table.column(time_column)),
            **{f"_hw_e{j}": pc.cast(table.column(c), pa.string()) for j, c in enumerate(ent_cols)},
        }
    )
    names = {
        "labels": f"_hw_labels_{tag}",
        "match": f"_hw_match_{tag}",
        "rids": f"_hw_rids_{tag}",
        **{f"keys{j}": f"_hw_keys{j}_{tag}" for j in range(len(ent_cols))},
    }
    labels_sql = store.stage(staged, names["labels"])
    try:
        for j in range(len(ent_cols)):
            # A Set table: probed per file without being rebuilt for each (an IN subquery is).
            store.execute(
                f"CREATE TABLE {names[f'keys{j}']} ENGINE = Set AS SELECT _hw_e{j} FROM {labels_sql}"
            )
        source = store.relation(FEATURE_TABLE, wanted)
        joins, rid_cols = [], []
        for i, fs in enumerate(sets):
            j = ent_cols.index(ent_of[fs])
            records, label_key = _records_sql(bitemporal, source, i, names[f"keys{j}"], labels_sql)
            on = f"l._hw_e{j} = r{i}.entity_key AND {label_key} >= r{i}.avail"
            joins.append(f"ASOF LEFT JOIN ({records}) r{i} ON {on}")
            rid_cols.append(f"r{i}.rid AS _hw_rid{i}")
        params = {f"fs{i}": fs for i, fs in enumerate(sets)}
        store.execute(
            f"CREATE TEMPORARY TABLE {names['match']} ENGINE = Memory AS "
            f"SELECT l._hw_row AS _hw_row, {', '.join(rid_cols)} FROM {labels_sql} AS l {' '.join(joins)} "
            "SETTINGS join_use_nulls = 1",
            params,
        )
        times = ", event_time, write_time" if include_timestamps else ""
        value_cols = ", ".join(_ident(ref) for ref in wanted)
        any_rid = " UNION DISTINCT ".join(
            f"SELECT assumeNotNull(_hw_rid{i}) AS _hw_rid FROM {names['match']} WHERE _hw_rid{i} IS NOT NULL"
            for i in range(len(sets))
        )
        # One scan of the lake filtered by a Set of the matched ids (cheaper than a semi join);
        # the values go to the labels by rid here, in Arrow: cheaper than a 50-wide join and sort.
        store.execute(f"CREATE TABLE {names['rids']} ENGINE = Set AS {any_rid}")
        values = store.query(
            f"SELECT {_ROW_ID} AS rid{times}, {value_cols} FROM {source} WHERE rid IN {names['rids']}"
        )
        match = store.query(f"SELECT * FROM {names['match']} ORDER BY _hw_row")
    finally:
        for name in names.values():
            store.unstage(name)
    features = _by_rid(values, match, sets, out_names, include_timestamps)
    return _attach(labels, table, features)


def _by_rid(
    values: pa.Table,
    match: pa.Table,
    sets: Mapping[str, list[str]],
    out_names: Mapping[str, str],
    include_timestamps: bool,
) -> pa.Table:
    """Per label (``match``'s rows, in label order) and feature set, the columns of its matched lake row."""
    rids = values.column("rid").to_numpy()
    order = np.argsort(rids, kind="stable")
    sorted_rids = rids[order]
    columns: dict[str, pa.ChunkedArray | pa.Array] = {}
    for i, fs in enumerate(sets):
        wanted = match.column(f"_hw_rid{i}")
        found = pc.is_valid(wanted).to_numpy(zero_copy_only=False)
        keys = pc.fill_null(wanted, 0).to_numpy()
        at = np.minimum(np.searchsorted(sorted_rids, keys), max(len(sorted_rids) - 1, 0))
        hit = found & (sorted_rids[at] == keys) if len(sorted_rids) else np.zeros(len(keys), bool)
        take = pa.array(order[at] if len(sorted_rids) else np.zeros(len(keys), np.int64), mask=~hit)
        for f in sets[fs]:
            columns[out_names[f"{fs}:{f}"]] = values.column(f"{fs}:{f}").take(take)
        if include_timestamps:
            columns[f"{fs}:event_time"] = values.column("event_time").take(take)
            columns[f"{fs}:write_time"] = values.column("write_time").take(take)
    return pa.table(columns)
