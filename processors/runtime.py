"""The processor runtime: consume, apply pure logic, make effects durable, then advance.

A processor is pure logic behind :class:`Processor`: given decoded events it returns
:class:`Effects` (events to publish, rejected events) and changes its own state, which it
hands out with :meth:`Processor.state_changes`. The runner does all I/O, in this order for
each batch:

1. poll a batch of events (undecodable records are dead-lettered by the consumer); for a
   processor with ``event_time_aligned``, release them in event-time order across partitions
   (see :class:`_Aligner`);
2. ``processor.handle(events)``; rejected events go to ``dead-letters`` with their reason;
3. publish the outputs and apply ``processor.flush_effects()`` (online store, lake files),
   whose rejected records go to ``dead-letters`` too, then wait until every output and dead
   letter is acknowledged by the broker;
4. commit the state changes together with the next input offsets (one LMDB transaction);
5. commit the consumer group offsets (for lag monitoring; the state store is authoritative).

A crash anywhere replays at most the batch in flight, from exactly the state it started
with, so the outputs are the same records again, and their consumers are idempotent.

No single record stops a processor: one it cannot use is *rejected* (dead-lettered, see
:mod:`streams.dead_letters`) and the processor goes on. Processors catch per record, in
``handle`` and in ``flush_effects`` (a store write, a lake file), what :func:`record_fault`
tells apart from a failure of the processor's environment (a disk, a store, the broker): that
one stops the processor, with the offsets of what it had not made durable left uncommitted, for
an operator to fix; the processors beside it go on (:mod:`processors.worker`).

This runner is the ``native`` engine (``settings.processors.engine``); the default, ``faust``
(:mod:`processors.faust`), hosts the same objects with the same state store, positions and
aligner in Faust apps, at about the same events/s per core (``benchmarks/faust_streaming.py``).
Neither relies on Kafka offset commits or Faust's table changelogs: at-least-once commits let
changelogs run ahead of offsets, which double-applies aggregation state after a crash.
Processors stay pure, so a Flink job could host them too.
"""

from __future__ import annotations

import gc
import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from headwater.settings import Settings
from processors.state_store import Position, StateStore
from streams.consumer import Event, EventConsumer
from streams.producer import EventProducer
from streams.serde import Serde

__all__ = ["Effects", "InputsDone", "Processor", "Rejected", "StreamRunner", "record_fault"]

log = logging.getLogger(__name__)

FETCH_WAIT_MAX_MS = 50  # longest a fetch waits for records (freshness, see StreamRunner)


Rejected = list[tuple[Event, Exception]]  # records a processor could not use, with why
# With ``until_caught_up``: None while a processor writing to this one's inputs still runs, then
# the next offset per (physical topic, partition) after everything they wrote there.
InputsDone = Callable[[], Mapping[Position, int] | None]

# Libraries whose errors are failures of where a processor runs (a store, files, the broker),
# never of a record's content, wherever they are raised from.
_ENVIRONMENT_LIBRARIES = frozenset({"lmdb", "redis", "aerospike", "confluent_kafka", "cimpl", "aiokafka"})


def record_fault(error: BaseException) -> bool:
    """True when ``error`` is a record's own fault (its content), so that rejecting the record and
    going on is right; False when the processor's environment failed: an ``OSError`` (disk, files,
    sockets), ``MemoryError``, or an error of a storage or Kafka library, anywhere in the chain of
    causes (``raise ... from``). Rejecting records for an environment failure would send every
    valid record to dead letters while the store or disk is broken."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, OSError | MemoryError):
            return False
        if type(exc).__module__.partition(".")[0] in _ENVIRONMENT_LIBRARIES:
            return False
        pending += [exc.__cause__, exc.__context__]
    return True


@dataclass
class Effects:
    """What a batch of events caused: events to publish and events to reject."""

    outputs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (logical topic, record)
    rejected: Rejected = field(default_factory=list)


class Processor(Protocol):
    """Pure processing logic; see the module docstring for how it is run."""

    name: str
    inputs: list[str]  # logical topics
    outputs: list[str]  # logical topics it publishes to (dead letters aside: every processor may)
    event_time_aligned: bool  # merge partitions in event-time order (keyed by another entity)

    def handle(self, events: list[Event], write_time_ms: int) -> Effects:
        """Apply a batch; a record that cannot be used goes to ``Effects.rejected`` (a
        :func:`record_fault`), never raises for one record."""
        ...

    def should_flush(self, now_s: float) -> bool:
        """False to keep accumulating (nothing is committed until the next flush)."""
        ...

    def flush_effects(self) -> Rejected | None:
        """Make side effects outside Kafka durable (store writes, files); called before commit.
        Returns the records whose effects could not be made (a :func:`record_fault`, e.g. a value a
        store or file refuses): they are dead-lettered, the rest is durable."""

    def state_changes(self) -> dict[str, bytes | None]:
        """State to persist since the last call (empty for stateless processors)."""
        ...


class StreamRunner:
    """Runs one :class:`Processor` in a consumer group until stopped."""

    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        processor: Processor,
        *,
        state: StateStore | None = None,
        batch_size: int = 5000,
        poll_timeout_s: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.processor = processor
        self.batch_size = batch_size
        self.poll_timeout_s = poll_timeout_s
        self._clock = clock
        self.state = state or StateStore(settings.data_dir / "state" / processor.name)
        self._positions = self.state.positions()
        self.producer = EventProducer(settings, serde, client_id=processor.name)
        self.consumer = EventConsumer(
            settings, serde, processor.inputs, group_id=f"headwater-{processor.name}", name=processor.name,
            dead_letters=self.producer, start_offsets=self._start_offset,
            # The embedded broker answers a fetch only when fetch.wait.max.ms (default 500 ms) has
            # passed, even when records arrived meanwhile: ~250 ms more per hop of freshness.
            config={"fetch.wait.max.ms": FETCH_WAIT_MAX_MS},
        )  # fmt: skip
        self._aligner = (
            _Aligner(self.consumer, batch_size, future_ms=_future_ms(processor), clock=clock)
            if processor.event_time_aligned
            else None
        )
        self._logical = {self.consumer.catalog.name(t): t for t in processor.inputs}
        # Next input offsets of everything handled since the last commit (a processor may hold
        # several batches before ``should_flush``).
        self._uncommitted: dict[Position, int] = {}
        self._gc = _LongLivedObjects()
        self.processed = 0
        self.batches = 0

    @property
    def dead_lettered(self) -> int:
        return self.consumer.dead_lettered

    @property
    def dead_letters_lost(self) -> int:
        return self.consumer.dead_letters_lost

    def _start_offset(self, topic: str, partition: int) -> int | None:
        return self._positions.get((topic, partition))

    def run_once(self) -> int:
        """Process one batch; returns how many events it held (0 when idle)."""
        polled = self.consumer.poll(self.batch_size, self.poll_timeout_s)
        if self._aligner is None:
            events, positions = polled, self.consumer.pending()
        else:
            events, positions = self._aligner.release(polled)
        if events or positions:
            watch = getattr(self.processor, "watch", None)
            if watch is not None:  # the partitions whose watermarks matter (processors.features)
                logical = self._logical
                watch({(logical[t], p) for t, p in self.consumer.assignment() if t in logical})
            effects = self.processor.handle(events, int(self._clock() * 1000))
            send = self.producer.send
            for topic, record in effects.outputs:
                send(topic, record)
            for event, error in effects.rejected:
                self.consumer.dead_letter(event, error)
            self.processed += len(events)
            self._uncommitted.update(positions)
            # The in-memory state is ahead of the committed positions until the next flush: a
            # partition assigned again meanwhile resumes where that state is.
            self._positions.update(positions)
            self._gc.after_batch()
        # Asked when idle too, so that held work is committed once the processor's interval passes.
        if self._uncommitted and self.processor.should_flush(self._clock()):
            self._commit(self._uncommitted)
        return len(events)

    def _commit(self, positions: dict[Position, int]) -> None:
        """Make the effects of everything handled durable, then the state and positions."""
        for event, error in self.processor.flush_effects() or ():
            self.consumer.dead_letter(event, error)
        self.producer.flush()
        self.state.commit(self.processor.state_changes(), positions)
        self._positions.update(positions)
        self.consumer.commit(positions)
        self._uncommitted = {}
        self.batches += 1

    def run(
        self, stop: threading.Event, *, until_caught_up: bool = False, inputs_done: InputsDone | None = None
    ) -> None:
        """Loop until ``stop`` is set (or, with ``until_caught_up``, the inputs are drained, and
        ``inputs_done`` says that the processors writing to them have finished and everything
        they wrote has been read)."""
        log.info("%s: starting on %s", self.processor.name, self.processor.inputs)
        while not stop.is_set():
            n = self.run_once()
            drained = self._aligner is None or self._aligner.buffered == 0
            if (
                until_caught_up
                and n == 0
                and drained
                and self.consumer.caught_up()
                and reached(inputs_done, self._positions)
            ):
                break
        # Whatever a processor still holds is made durable before stopping (a crash replays it).
        if self._aligner is None:
            self._commit({**self._uncommitted, **self.consumer.pending()})
        elif self._uncommitted:  # positions as the aligner released them: buffered events replay
            self._commit(self._uncommitted)

    def close(self) -> None:
        try:
            self.consumer.close()
        finally:
            self.producer.close()
            self.state.close()


def reached(inputs_done: InputsDone | None, positions: Mapping[Position, int]) -> bool:
    """True when the processors writing to the inputs have finished (``inputs_done`` answers) and
    ``positions`` (next offsets handled) are past everything they wrote."""
    if inputs_done is None:
        return True
    written = inputs_done()
    return written is not None and all(positions.get(tp, 0) >= offset for tp, offset in written.items())


class _Aligner:
    """Releases events in event-time order across partitions (a watermark merge).

    A feature set keyed by another entity than its topic (items, on a topic keyed by user)
    sees one entity's events spread over partitions, fetched in arbitrary interleaving. The
    aligner buffers each partition and releases the event with the smallest event time among
    the partitions' heads, as long as every partition either has a buffered event or has
    reached its end (a partition with nothing to say cannot hold back the others). Ties in
    event time go to the partition first in (topic, partition) order, so a backlog is released
    in the same order however its partitions were fetched. An event dated more than
    ``future_ms`` ahead of now is released at once (it will be rejected as from the future;
    at its partition's head it would hold the partition back forever). Positions to commit
    stop at the first event still buffered, so a crash replays exactly those. A partition
    whose buffer passes ``max_buffered`` is paused until it drains.
    """

    def __init__(
        self,
        consumer: EventConsumer,
        batch_size: int,
        max_buffered: int = 50_000,
        *,
        future_ms: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.consumer = consumer
        self.batch_size = batch_size
        self.max_buffered = max_buffered
        self.future_ms = future_ms
        self._clock = clock
        self._buffers: dict[Position, deque[Event]] = {}
        self._paused: set[Position] = set()
        self._physical = {s.logical: consumer.catalog.name(s.logical) for s in consumer.catalog.specs()}

    @property
    def buffered(self) -> int:
        return sum(len(b) for b in self._buffers.values())

    def release(self, polled: list[Event]) -> tuple[list[Event], dict[Position, int]]:
        for event in polled:
            key = (self._physical[event.topic], event.partition)
            self._buffers.setdefault(key, deque()).append(event)
        out: list[Event] = []
        assigned = self.consumer.assignment()
        at_end = self.consumer.at_end
        buffers = self._buffers

        def holds_back(tp: Position) -> bool:  # a partition that may still bring older events
            return tp in assigned and not buffers.get(tp) and not at_end(*tp)

        # A k-way merge on a heap of the partitions' heads, smallest (event time, partition)
        # first. Only a partition running empty can start holding the merge back, so that is
        # checked when one does.
        if not any(holds_back(tp) for tp in assigned):
            latest = None if self.future_ms is None else int(self._clock() * 1000) + self.future_ms

            def order(event: Event) -> int:
                t = event.record.get("event_time")
                if type(t) is not int or (latest is not None and t > latest):
                    return -1  # rejected when handled: released at once
                return t

            heap = [(order(b[0]), tp) for tp, b in buffers.items() if b]
            heapq.heapify(heap)
            limit, append = self.batch_size, out.append
            while heap and len(out) < limit:
                _, tp = heap[0]
                buffer = buffers[tp]
                append(buffer.popleft())
                if buffer:
                    heapq.heapreplace(heap, (order(buffer[0]), tp))
                else:
                    heapq.heappop(heap)
                    if holds_back(tp):
                        break
        self._flow_control()
        positions = self.consumer.pending()
        for tp, buffer in buffers.items():
            if buffer:
                positions[tp] = buffer[0].offset
        return out, positions

    def _flow_control(self) -> None:
        full = [
            tp for tp, b in self._buffers.items() if len(b) > self.max_buffered and tp not in self._paused
        ]
        drained = [tp for tp in self._paused if len(self._buffers.get(tp, ())) < self.max_buffered // 2]
        if full:
            self.consumer.pause(full)
            self._paused.update(full)
        if drained:
            self.consumer.resume(drained)
            self._paused.difference_update(drained)


def _future_ms(processor: Processor) -> int | None:
    """How far ahead of now a processor's events may be dated (None: no limit)."""
    aggregator = getattr(processor, "aggregator", None)
    future: int | None = getattr(aggregator, "max_future_ms", None)
    return future


class _LongLivedObjects:
    """Keeps CPython's cyclic garbage collector off the processors' long-lived state.

    A feature processor holds hundreds of thousands of small lists (tiles and snapshots per
    entity) that live for hours, while every batch allocates and frees as many short-lived
    objects. The collector's full collections, triggered every few batches, walked all of that
    state each time: 28% of the CPU per event in ``benchmarks/features_streaming.py``. After each
    batch the survivors go to the permanent generation (``gc.freeze``), so collections walk only
    what later batches allocate; objects still die by reference counting as before. Every
    ``full_every_s`` they are unfrozen and collected once, so that cyclic garbage frozen by
    chance is still reclaimed. Process-wide, and harmless with several runners in threads.
    """

    def __init__(self, full_every_s: float = 120.0) -> None:
        self.full_every_s = full_every_s
        self._last_full = time.monotonic()

    def after_batch(self) -> None:
        if not gc.isenabled():  # the embedding application manages collection itself
            return
        now = time.monotonic()
        if now - self._last_full >= self.full_every_s:
            self._last_full = now
            gc.unfreeze()
            gc.collect()
        gc.freeze()
