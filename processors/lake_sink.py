"""The lake sink: every topic archived to Parquet, offsets committed only once files are durable.

It accumulates events and writes when ``max_rows`` are held or ``max_age_s`` has passed since
the first unwritten event, so files stay large under a trickle of traffic. Until a write
returns nothing is committed, so a crash replays the held events, and the lake writer's
offset-range file names make the rewrite replace instead of duplicate
(:mod:`processors.lake.layout`).

One row the Parquet writer refuses (a value its column cannot hold) is dead-lettered and left
out; the rest of its file is archived. A file that cannot be written (a read-only or full disk)
stops the sink, with nothing committed past what is durable.
"""

from __future__ import annotations

import time
from collections import defaultdict

from processors.lake import LakeRow, LakeWriter
from processors.runtime import Effects, Rejected
from streams.consumer import Event
from streams.topics import TOPICS

_At = tuple[int, int]  # partition, offset

__all__ = ["LakeSink"]


class LakeSink:
    """Archives its input topics (all of them by default) into the Parquet lake."""

    def __init__(
        self,
        writer: LakeWriter,
        topics: list[str] | None = None,
        *,
        max_rows: int = 50_000,
        max_age_s: float = 2.0,
    ) -> None:
        self.name = "lake-sink"
        self.inputs = topics or [s.logical for s in TOPICS]
        self.outputs: list[str] = []
        self.event_time_aligned = False
        self.writer = writer
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self._held: dict[str, list[LakeRow]] = defaultdict(list)
        # The event of each held row, per topic and (partition, offset): a row the lake refuses
        # is dead-lettered with its original bytes.
        self._events: dict[str, dict[_At, Event]] = defaultdict(dict)
        self._count = 0
        self._since: float | None = None
        self.files_written = 0

    def handle(self, events: list[Event], write_time_ms: int) -> Effects:
        effects = Effects()
        for e in events:
            if e.tombstone:
                continue  # a deletion leaves no row; the restore rebuilds latest values only
            try:
                key = e.key.decode() if e.key else None
            except UnicodeDecodeError as exc:  # the lake's key column is text
                effects.rejected.append((e, exc))
                continue
            self._held[e.topic].append(LakeRow(e.partition, e.offset, e.record, key))
            self._events[e.topic][(e.partition, e.offset)] = e
        self._count += len(events)
        if events and self._since is None:
            self._since = time.monotonic()
        return effects

    def should_flush(self, now_s: float) -> bool:
        if self._count >= self.max_rows:
            return True
        return self._since is not None and time.monotonic() - self._since >= self.max_age_s

    def flush_effects(self) -> Rejected:
        rejected: Rejected = []
        for topic, rows in self._held.items():
            events = self._events[topic]

            def refused(row: LakeRow, error: Exception, events: dict[_At, Event] = events) -> None:
                rejected.append((events[(row.partition, row.offset)], error))

            self.files_written += len(self.writer.write(topic, rows, on_bad_row=refused))
        self._held.clear()
        self._events.clear()
        self._count = 0
        self._since = None
        return rejected

    def state_changes(self) -> dict[str, bytes | None]:
        return {}
