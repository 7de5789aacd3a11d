"""The lake layout and how batches are cut into files (pure functions, no I/O).

Layout::

    <lake_dir>/<topic>/date=YYYY-MM-DD/<topic>+<partition>+<first_offset>-<last_offset>.parquet

``<topic>`` is the logical topic name (without the deployment's prefix); the date is the
UTC date of the event time. Files being written are ``.<name>.<pid>.tmp`` beside their final
name, so no reader glob (``*.parquet``) ever sees a partial file.

How batches are cut (the idempotence scheme)
--------------------------------------------
A batch is whatever the sink flushes at once. For each partition in it, the batch covers the
offset range ``[first, last]`` of its rows, and **every file of that batch is named by that
range**, in each date folder the batch has rows for. The name is a function of the topic,
partition and offsets only, so re-processing the same offsets after a crash rewrites the
same names (atomically replacing the files), never adds rows.

A restarted sink may cut its batches differently (it flushes on size or time). Then a new
range overlaps files of the crashed run without having their name. Rule: a write of
``[first, last]`` *supersedes* every existing file of that partition whose range overlaps
it, and transitively every file overlapping those (:func:`superseded`). Their rows that lie
outside ``[first, last]`` are kept -- rewritten once, deduplicated by offset, into a file
named by the range of the kept rows below ``first`` and one for those above ``last`` -- and
the superseded files are deleted. Within one partition, an offset therefore lives in exactly
one file after every write, whatever the batch boundaries were. (Rows at one offset are one
Kafka record, so which copy survives does not matter. New files are renamed in before the
superseded ones are deleted, so for that instant -- only on the first flush after a crash --
a reader may count a row twice; ``uniqExact(_partition, _offset)`` is exact.)
With offsets committed only after :meth:`LakeWriter.write` returns, the restarted sink
re-reads from the first offset of the crashed batch, so the common case is an exact rewrite
or a superseded file that starts at ``first``; the general rule also covers anything else.

Offsets in the lake are *lake offsets*: the Kafka offset plus the partition's base for the
current broker epoch (see :mod:`processors.lake.writer`), so a memory-only broker that
restarts at offset 0 never collides with files already in the lake.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

__all__ = [
    "FileName",
    "FilePlan",
    "LakeRow",
    "date_of",
    "plan_files",
    "superseded",
]

_NAME_RE = re.compile(r"^(?P<topic>[A-Za-z0-9._-]+)\+(?P<p>\d+)\+(?P<first>\d+)-(?P<last>\d+)\.parquet$")
DATE_PREFIX = "date="


class LakeRow(NamedTuple):
    """One record to archive: where it came from in Kafka, its decoded value and its key."""

    partition: int
    offset: int
    record: Mapping[str, Any]
    key: str | None = None


@dataclass(frozen=True, order=True)
class FileName:
    """``<topic>+<partition>+<first>-<last>.parquet``: a partition's offset range, inclusive."""

    partition: int
    first: int
    last: int
    topic: str = field(compare=False)

    def __post_init__(self) -> None:
        if self.first > self.last or self.first < 0:
            raise ValueError(f"bad offset range {self.first}-{self.last}")

    @property
    def name(self) -> str:
        return f"{self.topic}+{self.partition}+{self.first}-{self.last}.parquet"

    def overlaps(self, first: int, last: int) -> bool:
        return self.first <= last and first <= self.last

    @classmethod
    def parse(cls, name: str) -> FileName | None:
        """The parts of a lake file name, or None for anything else (temporary files, strays)."""
        m = _NAME_RE.match(name)
        if m is None:
            return None
        return cls(int(m["p"]), int(m["first"]), int(m["last"]), m["topic"])


@dataclass(frozen=True)
class FilePlan:
    """One file to write: its date folder, its name, and its rows in offset order."""

    date: str
    file: FileName
    rows: tuple[LakeRow, ...]

    @property
    def relpath(self) -> str:
        return f"{self.file.topic}/{DATE_PREFIX}{self.date}/{self.file.name}"


def date_of(epoch_ms: int) -> str:
    """UTC date of an epoch-milliseconds time, as used in ``date=`` folder names."""
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).strftime("%Y-%m-%d")


def _date(row: LakeRow, default_ms: int) -> str:
    value = row.record.get("event_time")
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return date_of(value)
        except (OverflowError, ValueError, OSError):
            pass  # not a plausible epoch-ms time: file it under the day it was written
    return date_of(default_ms)


def plan_files(topic: str, rows: Iterable[LakeRow | tuple[Any, ...]], now_ms: int) -> list[FilePlan]:
    """Cut one flushed batch into files: one per (partition, date), named by the partition's range.

    ``rows`` are ``(partition, offset, record[, key])`` with lake offsets; a duplicate offset
    keeps its last row. ``now_ms`` dates records that have no ``event_time``.
    """
    by_partition: dict[int, dict[int, LakeRow]] = {}
    for raw in rows:
        row = raw if isinstance(raw, LakeRow) else LakeRow(*raw)
        by_partition.setdefault(row.partition, {})[row.offset] = row
    plans: list[FilePlan] = []
    for partition in sorted(by_partition):
        offsets = by_partition[partition]
        name = FileName(partition, min(offsets), max(offsets), topic)
        by_date: dict[str, list[LakeRow]] = {}
        for offset in sorted(offsets):
            row = offsets[offset]
            by_date.setdefault(_date(row, now_ms), []).append(row)
        plans.extend(FilePlan(date, name, tuple(rs)) for date, rs in sorted(by_date.items()))
    return plans


def superseded(existing: Sequence[FileName], new: FileName) -> list[FileName]:
    """Existing files of ``new``'s partition that a write of ``new`` replaces.

    Every file overlapping ``new``'s range, then every file overlapping one of those, and so
    on (a crashed run and a restarted one may each have left overlapping files). ``new``'s
    own name is included when it exists: it is rewritten in place.
    """
    candidates = sorted({f for f in existing if f.partition == new.partition})
    lo, hi = new.first, new.last
    chosen: list[FileName] = []
    changed = True
    while changed:
        changed = False
        for f in candidates:
            if f not in chosen and f.overlaps(lo, hi):
                chosen.append(f)
                lo, hi = min(lo, f.first), max(hi, f.last)
                changed = True
    return sorted(chosen)


def split_kept(offsets: Iterable[int], first: int, last: int) -> tuple[list[int], list[int]]:
    """Offsets of superseded rows to keep: those below ``first`` and those above ``last``."""
    below = sorted({o for o in offsets if o < first})
    above = sorted({o for o in offsets if o > last})
    return below, above


def range_of(offsets: Sequence[int]) -> tuple[int, int] | None:
    return (min(offsets), max(offsets)) if offsets else None


def group_by_partition(rows: Iterable[LakeRow]) -> Mapping[int, list[LakeRow]]:
    out: dict[int, list[LakeRow]] = {}
    for row in rows:
        out.setdefault(row.partition, []).append(row)
    return out
