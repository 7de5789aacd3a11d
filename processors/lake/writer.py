"""The lake writer: durable, idempotent Parquet files per topic/partition/offset range.

The Kafka edge of the lake sink consumes a batch, calls :meth:`LakeWriter.write` and commits
the batch's offsets only after it returns: by then every file is written to a temporary
name, fsynced, renamed into place and its folder fsynced. The layout and how batches are cut
so that re-processing never duplicates rows are in :mod:`processors.lake.layout`.

Broker epochs. The embedded broker keeps its data in memory and starts again at offset 0
after a restart, while the lake keeps the files of every earlier run. So the lake stores
*lake offsets*: the Kafka offset plus a per-partition base that :meth:`LakeWriter.begin_epoch`
sets past everything already in the lake (kept in ``<lake_dir>/_epochs.json``). ``headwater
up`` calls it each time it starts the embedded broker, after restoring the compacted topics
and passing how many records it restored per partition: those first offsets are copies of
rows already in the lake, so :meth:`write` skips them. With an external Kafka cluster it is
never called and lake offsets equal Kafka offsets.

One writer owns a (topic, partition) at a time (Kafka's group assignment guarantees it); any
number of processes may read the lake meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from headwater.errors import HeadwaterError
from headwater.files import atomic_write
from headwater.settings import Settings
from processors.lake.columns import EventColumns, event_columns
from processors.lake.layout import DATE_PREFIX, FileName, FilePlan, LakeRow, plan_files, superseded
from processors.lake.manifest import record_added, remove_lake_file
from streams.catalog import SchemaCatalog
from streams.topics import TOPICS, TopicSpec

__all__ = ["EPOCHS_FILE", "LakeWriter", "TopicLake", "topic_spec", "write_parquet"]

log = logging.getLogger(__name__)

# What converting a row's values to Arrow raises for a value its column cannot hold (an integer
# beyond int32, a string in a number column): a fault of that row, not of the lake.
_ROW_ERRORS = (pa.ArrowException, OverflowError, ValueError, TypeError, KeyError)

EPOCHS_FILE = "_epochs.json"
_SPECS = {s.logical: s for s in TOPICS}


def topic_spec(topic: str, prefix: str = "") -> TopicSpec:
    """The catalog entry of a logical or prefixed topic name."""
    spec = _SPECS.get(topic)
    if spec is None and prefix and topic.startswith(prefix):
        spec = _SPECS.get(topic[len(prefix) :])
    if spec is None:
        raise HeadwaterError(f"unknown topic {topic!r}; known: {', '.join(_SPECS)}")
    return spec


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class TopicLake:
    """The files of one topic in the lake: where they are and what each holds."""

    root: Path
    topic: str

    @property
    def dir(self) -> Path:
        return self.root / self.topic

    def files(self) -> dict[FileName, list[Path]]:
        """Every complete file of the topic, grouped by name (one path per date folder)."""
        out: dict[FileName, list[Path]] = {}
        if not self.dir.is_dir():
            return out
        for date_dir in sorted(self.dir.iterdir()):
            if not date_dir.name.startswith(DATE_PREFIX):
                continue
            for entry in os.scandir(date_dir):
                parsed = FileName.parse(entry.name)
                if parsed is not None and parsed.topic == self.topic:
                    out.setdefault(parsed, []).append(Path(entry.path))
        return out

    def clean_temporary(self) -> list[Path]:
        """Delete temporary files left by a writer that died mid-write (its pid is gone)."""
        removed: list[Path] = []
        if not self.dir.is_dir():
            return removed
        for tmp in self.dir.glob(f"{DATE_PREFIX}*/.*.tmp"):
            try:
                pid = int(tmp.name.rsplit(".", 2)[-2])
            except ValueError:
                pid = -1
            if pid != os.getpid() and not (pid > 0 and _pid_alive(pid)):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
                log.info("removed temporary file %s left by a crashed writer", tmp)
        return removed


class LakeWriter:
    """Writes batches of one process's partitions to the lake; see the module docstring."""

    def __init__(self, settings: Settings, catalog: SchemaCatalog) -> None:
        self.root = settings.lake_dir
        self.prefix = settings.topic_prefix
        self.catalog = catalog
        self._columns: dict[str, EventColumns] = {}
        self._cleaned: set[str] = set()
        self._epoch: dict[str, Any] | None = None
        self._epoch_stamp: int | None = None

    # -- epochs -------------------------------------------------------------------------
    def _load_epochs(self) -> list[dict[str, Any]]:
        path = self.root / EPOCHS_FILE
        if not path.is_file():
            return []
        epochs: list[dict[str, Any]] = json.loads(path.read_text())["epochs"]
        return epochs

    def _current_epoch(self) -> dict[str, Any] | None:
        # Re-read when `headwater up` started an epoch after this writer was created.
        try:
            stamp = (self.root / EPOCHS_FILE).stat().st_mtime_ns
        except FileNotFoundError:
            return None
        if stamp != self._epoch_stamp:
            epochs = self._load_epochs()
            self._epoch, self._epoch_stamp = (epochs[-1] if epochs else None), stamp
        return self._epoch

    def begin_epoch(self, restored: Mapping[str, Mapping[int, int]] | None = None) -> int:
        """Start a broker epoch: lake offsets continue past every file already in the lake.

        ``restored`` maps topic -> partition -> how many records the restore step produced
        into the empty broker (Kafka offsets ``0 .. n-1``); :meth:`write` skips those.
        Returns the new epoch number.
        """
        epochs = self._load_epochs()
        bases: dict[str, dict[str, int]] = {}
        if self.root.is_dir():
            for topic_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name in _SPECS):
                for f in TopicLake(self.root, topic_dir.name).files():
                    per = bases.setdefault(f.topic, {})
                    per[str(f.partition)] = max(per.get(str(f.partition), 0), f.last + 1)
        epoch = {
            "epoch": len(epochs) + 1,
            "started_ms": int(time.time() * 1000),
            "base": bases,
            "restored": {
                topic_spec(t, self.prefix).logical: {str(p): int(n) for p, n in parts.items()}
                for t, parts in (restored or {}).items()
            },
        }
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / EPOCHS_FILE, json.dumps({"epochs": [*epochs, epoch]}, indent=1).encode())
        self._epoch_stamp = None
        log.info("lake epoch %d begins; offset bases %s", len(epochs) + 1, bases)
        return len(epochs) + 1

    def lake_offset(self, topic: str, partition: int, kafka_offset: int) -> int:
        """The lake offset a Kafka offset of the current broker epoch is stored at."""
        epoch = self._current_epoch() or {}
        base = epoch.get("base", {}).get(topic_spec(topic, self.prefix).logical, {}).get(str(partition), 0)
        return int(base) + kafka_offset

    # -- writing ------------------------------------------------------------------------
    def columns(self, topic: str) -> EventColumns:
        spec = topic_spec(topic, self.prefix)
        cols = self._columns.get(spec.logical)
        if cols is None:
            cols = event_columns(spec.event_type, self.catalog.latest(spec.event_type).raw)
            self._columns[spec.logical] = cols
        return cols

    def write(
        self,
        topic: str,
        rows: Iterable[LakeRow | tuple[Any, ...]],
        *,
        on_bad_row: Callable[[LakeRow, Exception], None] | None = None,
    ) -> list[Path]:
        """Archive one batch; returns the files written once they are durable.

        ``rows`` are ``(partition, kafka_offset, record[, key])`` with records decoded in the
        topic's latest schema; a missing key is derived from the record by the topic catalog.
        With ``on_bad_row``, a row whose values the Parquet writer refuses is given to it (as
        passed in) and left out, and the rest of its file is written; without, the write raises.
        Failures to write files (a full or read-only disk) always raise.
        """
        spec = topic_spec(topic, self.prefix)
        now = int(time.time() * 1000)
        epoch = self._current_epoch() or {}
        bases = epoch.get("base", {}).get(spec.logical, {})
        restored = epoch.get("restored", {}).get(spec.logical, {})
        lake_rows = []
        given: dict[int, LakeRow] = {}  # id of a lake row -> the row as given, for on_bad_row
        for raw in rows:
            row = raw if isinstance(raw, LakeRow) else LakeRow(*raw)
            part = str(row.partition)
            if row.offset < restored.get(part, 0):
                continue  # a restored copy of a row the lake already has
            try:
                key = row.key if row.key is not None else spec.key(dict(row.record))
            except Exception as exc:  # a record without the fields its key is made of
                if on_bad_row is None:
                    raise
                on_bad_row(row, exc)
                continue
            lake_row = LakeRow(row.partition, bases.get(part, 0) + row.offset, row.record, key)
            lake_rows.append(lake_row)
            given[id(lake_row)] = row
        if not lake_rows:
            return []
        lake = TopicLake(self.root, spec.logical)
        if spec.logical not in self._cleaned:
            lake.clean_temporary()
            self._cleaned.add(spec.logical)
        plans = plan_files(spec.logical, lake_rows, now)
        existing = lake.files()
        written: list[Path] = []

        def table_of(plan: FilePlan) -> pa.Table | None:
            if on_bad_row is None:
                return self._table(spec, plan, now)
            return self._table_without_bad_rows(spec, plan, now, lambda r, e: on_bad_row(given[id(r)], e))

        for name in sorted({p.file for p in plans}):
            tables = [(plan, table_of(plan)) for plan in plans if plan.file == name]
            mine = [(plan, table) for plan, table in tables if table is not None]
            if not mine:
                continue  # every row of the range refused: nothing to write or to supersede
            old = superseded(list(existing), name)
            kept = self._kept_rows(old, existing, name)
            for plan, table in mine:
                written.append(self._write_file(lake.dir / f"{DATE_PREFIX}{plan.date}", plan.file, table))
            written.extend(self._write_kept(lake, name, kept))
            new_paths = set(written)
            for f in old:
                for path in existing[f]:
                    if path not in new_paths:
                        remove_lake_file(path)
                        log.info(
                            "superseded %s (partition %d, offsets %d-%d)", path, f.partition, f.first, f.last
                        )
        return written

    def _table(self, spec: TopicSpec, plan: FilePlan, now: int) -> pa.Table:
        n = len(plan.rows)
        meta: dict[str, list[Any]] = {
            "_topic": [spec.logical] * n,
            "_partition": [plan.file.partition] * n,
            "_offset": [r.offset for r in plan.rows],
            "_key": [r.key for r in plan.rows],
            "_event_type": [spec.event_type] * n,
            "_ingest_time": [now] * n,
        }
        return self.columns(spec.logical).to_table([r.record for r in plan.rows], meta)

    def _table_without_bad_rows(
        self, spec: TopicSpec, plan: FilePlan, now: int, bad_row: Callable[[LakeRow, Exception], None]
    ) -> pa.Table | None:
        """The plan's table, less the rows Arrow refuses (each given to ``bad_row``); None if none is left."""
        try:
            return self._table(spec, plan, now)
        except _ROW_ERRORS as exc:
            bad = self._bad_rows(spec, plan, now, exc)
        for row, error in bad:
            bad_row(row, error)
        refused = {id(row) for row, _ in bad}
        good = tuple(row for row in plan.rows if id(row) not in refused)
        return self._table(spec, replace(plan, rows=good), now) if good else None

    def _bad_rows(
        self, spec: TopicSpec, plan: FilePlan, now: int, error: Exception
    ) -> list[tuple[LakeRow, Exception]]:
        """The rows of a plan whose table failed with ``error`` that fail alone, found by halving:
        one bad row among n costs about 2n rows converted, not n tables of one row."""
        if len(plan.rows) == 1:
            return [(plan.rows[0], error)]
        half = len(plan.rows) // 2
        bad: list[tuple[LakeRow, Exception]] = []
        for rows in (plan.rows[:half], plan.rows[half:]):
            part = replace(plan, rows=rows)
            try:
                self._table(spec, part, now)
            except _ROW_ERRORS as exc:
                bad += self._bad_rows(spec, part, now, exc)
        return bad

    def _kept_rows(
        self, old: Sequence[FileName], existing: Mapping[FileName, list[Path]], new: FileName
    ) -> dict[tuple[str, str], pa.Table]:
        """Rows of superseded files outside ``new``'s range, deduplicated by offset.

        Keyed by (side, date folder): side ``below`` holds offsets before ``new.first``,
        ``above`` those after ``new.last``.
        """
        if not old or old == [new]:
            return {}
        seen: set[int] = set()
        parts: dict[tuple[str, str], list[pa.Table]] = {}
        for f in old:
            for path in existing[f]:
                table = pq.read_table(path)
                offsets = table.column("_offset")
                for side, mask in (
                    ("below", pc.less(offsets, new.first)),
                    ("above", pc.greater(offsets, new.last)),
                ):
                    part = table.filter(mask)
                    fresh = [o not in seen for o in part.column("_offset").to_pylist()]
                    seen.update(part.column("_offset").to_pylist())
                    part = part.filter(pa.array(fresh, pa.bool_()))
                    if part.num_rows:
                        parts.setdefault((side, path.parent.name), []).append(part)
        return {
            key: pa.concat_tables(tables, promote_options="permissive").sort_by("_offset")
            for key, tables in parts.items()
        }

    def _write_kept(
        self, lake: TopicLake, new: FileName, kept: Mapping[tuple[str, str], pa.Table]
    ) -> list[Path]:
        """Rewrite kept rows: one name per side, from the range of that side's offsets."""
        ranges: dict[str, tuple[int, int]] = {}
        for (side, _date), table in kept.items():
            offsets = table.column("_offset")
            lo, hi = pc.min(offsets).as_py(), pc.max(offsets).as_py()
            old_lo, old_hi = ranges.get(side, (lo, hi))
            ranges[side] = (min(lo, old_lo), max(hi, old_hi))
        written = []
        for (side, date), table in sorted(kept.items()):
            lo, hi = ranges[side]
            written.append(
                self._write_file(lake.dir / date, FileName(new.partition, lo, hi, lake.topic), table)
            )
        return written

    @staticmethod
    def _write_file(directory: Path, name: FileName, table: pa.Table) -> Path:
        return write_parquet(directory, name, table)


def write_parquet(directory: Path, name: FileName, table: pa.Table) -> Path:
    """Write a lake file durably: temporary name, fsync, rename into place, fsync the folder; then
    record it in the topic's manifest (:mod:`processors.lake.manifest`)."""
    # Dictionaries help strings, counts and map keys; floats are written plain and uncompressed:
    # a double's bits do not repeat, so a dictionary only slows reading down and snappy only
    # copies them (a quarter of the CPU of reading a training set's values). Binary blobs (a
    # dead letter's bytes, partial aggregates) are unique too: no dictionary, but compressed.
    floats = {f.name for f in table.schema if pa.types.is_floating(f.type)}
    blobs = {f.name for f in table.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)}
    dictionary = [n for n in table.column_names if n not in floats and n not in blobs]
    compression = {n: "none" if n in floats else "snappy" for n in table.column_names}
    path = atomic_write(
        directory / name.name,
        lambda fh: pq.write_table(table, fh, use_dictionary=dictionary, compression=compression),
    )
    record_added(path, table.num_rows)
    return path
