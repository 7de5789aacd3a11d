"""The Faust engine: the platform's pure processors hosted by Faust apps.

Each processor gets a Faust app of its own (app id = consumer group ``headwater-faust-<name>``)
subscribed to the processor's source topics, whose consumer hands each fetched batch of raw
records to :class:`FaustHost`, which does what :class:`processors.runtime.StreamRunner`
does per batch, with the same objects: decode with our :class:`~streams.serde.Serde`
(undecodable records -> ``dead-letters``), release in event-time order for aligned processors
(the runtime's aligner, fed from Faust's partitions), ``processor.handle``, publish with our
:class:`~streams.producer.EventProducer`, and at each flush: ``flush_effects``, wait for the
broker's acknowledgements, then commit the state with its input positions in the processor's
:class:`~processors.state_store.StateStore` (the same directory as the native runner's, so
the engines can be switched over one state).

Where Faust's own semantics are bypassed, and why:

* Offsets. Faust commits the offsets of acknowledged events on its own schedule, which can
  run ahead of what is durable. Its consumer is subclassed so that every seek Faust makes "to
  the committed offsets" (after each assignment and recovery) goes to the state store's
  positions instead; Faust's commits remain, on its schedule, for lag monitoring only, and
  commit the positions the state store holds (never ahead of them).
* Agents and streams. Faust turns every record into a Message and an Event and passes each
  through its conductor to an agent's stream with two tasks and an ``asyncio.wait``: ~4/5 of
  the engine's CPU per event (a third of the native engine's events/s per core). No agent
  here: the consumer's fetch loop (:mod:`processors.faust.consumer`) hands aiokafka's records
  to the host as fetched, keeping what Faust's loop guarantees (no records across a
  rebalance's flow stop, none before a partition's read offset after a seek).
* Fetch wait. Faust fixes aiokafka's ``fetch_max_wait_ms`` at 1500; the embedded broker answers
  a fetch only when it expires, so it is ``processors.faust_fetch_max_wait_ms`` here (50 ms, as
  the native engine's).
* State. No Faust tables: their changelogs are at-least-once, written ahead of the offsets,
  and double-apply aggregation state after a crash (``processors/state_store.py``). The
  processor's state lives in the state store, committed atomically with its positions.
* Outputs. Our producer (librdkafka, idempotent, Avro single-object encoding) rather than
  Faust's: the same bytes and keys as the native engine, and one ``flush`` to wait on before
  a commit. Records are re-emitted identically after a crash; consumers are idempotent.
* Flow control. An aligned processor's buffer is bounded by pausing the partitions that fill
  it (``processors.runtime._Aligner``). That is done in aiokafka, not with Faust's
  ``pause_partitions``: its ``resume_partitions`` leaves aiokafka's partition type in its
  active set, which fails Faust's assertions at the next pause and at ``app.stop()``; with
  Faust's own type, a small bound stalled the fetcher (the partitions left active got no more
  records: tests/processors/test_faust_engine.py); and Faust only filters what aiokafka has
  already consumed, dropping the records of a partition paused while a fetch is delivered.
  aiokafka's pause keeps the position of what it has not delivered, and Faust never sees a
  partition as paused (its stop, commits and rebalances are unchanged).
* Topics. The platform creates its topics with explicit configs; Faust may not declare any
  (``topic_allow_declare=False``, and no leader topic), since the embedded broker gives a
  topic created without configs an empty config.

``benchmarks/faust_streaming.py`` measures this engine and the native one on the same events.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import faust
from aiokafka.codec import has_lz4
from aiokafka.structs import ConsumerRecord, TopicPartition
from faust.types import TP

from headwater.errors import ConfigError, HeadwaterError
from headwater.settings import Settings
from processors.faust.consumer import PositionedConsumer, Records, faust_app
from processors.runtime import InputsDone, Processor, _Aligner, _future_ms, _LongLivedObjects, reached
from processors.state_store import Position, StateStore
from streams.consumer import Event, EventConsumer
from streams.consumer import _event as _new_event
from streams.dead_letters import DeadLetters, oversized
from streams.kafka import message_limit
from streams.producer import EventProducer
from streams.serde import DecodeError, Serde
from streams.topics import TopicCatalog

__all__ = ["FaustHost"]

log = logging.getLogger(__name__)

IDLE_INTERVAL_S = 0.1  # how often held events and commits progress when no batch arrives
JOIN_TIMEOUT_S = 60.0  # with ``until_caught_up``: a worker that gets no partition by then fails


class FaustHost:
    """Runs one :class:`~processors.runtime.Processor` in a Faust app until stopped."""

    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        processor: Processor,
        *,
        state: StateStore | None = None,
        batch_size: int | None = None,
        poll_timeout_s: float = 0.05,
        clock: Callable[[], float] = time.time,
        max_buffered: int = 50_000,
    ) -> None:
        if not has_lz4():  # else Faust's fetcher crashes on the first batch of records
            raise ConfigError(
                "the Faust engine cannot read Headwater's topics: every Headwater producer compresses "
                "with lz4, which aiokafka decodes only with `cramjam` installed (pip install "
                "'aiokafka[lz4]'); install it or set processors.engine to 'native'"
            )
        self.settings = settings
        self.serde = serde
        self.processor = processor
        self.batch_size = batch_size or settings.processors.faust_batch_size
        self.poll_timeout_s = poll_timeout_s
        self._clock = clock
        self.catalog = TopicCatalog(settings)
        self._specs = {self.catalog.name(t): self.catalog.spec(t) for t in processor.inputs}
        self.state = state or StateStore(settings.data_dir / "state" / processor.name)
        self._positions = self.state.positions()
        self._durable = dict(self._positions)  # what the state store holds: Faust commits these
        self.producer = EventProducer(settings, serde, client_id=processor.name)
        self.message_limit = message_limit(settings)
        self.letters = DeadLetters(self.producer, processor.name, self.message_limit)
        self._pending: dict[Position, int] = {}  # next offset per partition of everything received
        self._uncommitted: dict[Position, int] = {}
        # The runtime's aligner asks a consumer for its assignment, partition ends and pending
        # positions; this host answers from Faust's consumer (see the methods below).
        self._aligner = (
            _Aligner(
                cast(EventConsumer, self),
                self.batch_size,
                max_buffered,
                future_ms=_future_ms(processor),
                clock=clock,
            )
            if processor.event_time_aligned
            else None
        )
        self._gc = _LongLivedObjects()
        self._app: faust.App | None = None
        self._closed = False  # once set, batches still delivered by Faust are left to replay
        self.error: BaseException | None = None
        self.processed = 0
        self.batches = 0
        self.dead_lettered = 0
        self.pauses = 0  # partitions paused by the aligner's flow control

    def _start_offset(self, topic: str, partition: int) -> int | None:
        return self._positions.get((topic, partition))

    # --- what the aligner asks of a consumer ----------------------------------------------------

    def assignment(self) -> set[Position]:
        if self._app is None:
            return set()
        return {(tp.topic, tp.partition) for tp in self._app.consumer.assignment() if tp.topic in self._specs}

    def at_end(self, topic: str, partition: int) -> bool:
        """True when everything up to the partition's high watermark (from fetches) was received."""
        if self._app is None:
            return False
        try:
            highwater = self._app.consumer.highwater(_tp(topic, partition))
        except Exception:  # not assigned (any more): not known to be at its end
            return False
        if highwater is None:
            return False
        position = self._pending.get((topic, partition), self._positions.get((topic, partition), 0))
        return position >= highwater

    def pending(self) -> dict[Position, int]:
        return dict(self._pending)

    def pause(self, partitions: list[Position]) -> None:
        self.pauses += len(partitions)
        self._fetching(partitions, resume=False)

    def resume(self, partitions: list[Position]) -> None:
        self._fetching(partitions, resume=True)

    def _fetching(self, partitions: list[Position], *, resume: bool) -> None:
        """Pause or resume fetching in aiokafka, under Faust (see the module docstring).

        aiokafka's consumer lives on the Faust consumer's thread and loop: the call is queued
        there, in order, and takes effect within a fetch. Records of a partition already handed
        to Faust still arrive (the aligner buffers them); those aiokafka holds for a paused
        partition are dropped without moving its position, so they are fetched again on resume.
        """
        if self._app is None or not partitions:
            return
        thread = cast(PositionedConsumer, self._app.consumer)._thread
        tps = [TopicPartition(t, p) for t, p in partitions]

        def apply() -> None:  # on the consumer's thread
            consumer = thread._consumer
            if consumer is None:  # stopped meanwhile
                return
            assigned = consumer.assignment()  # a partition revoked meanwhile: nothing to do
            (consumer.resume if resume else consumer.pause)(*(tp for tp in tps if tp in assigned))

        thread.thread_loop.call_soon_threadsafe(apply)

    def caught_up(self) -> bool:
        assigned = self.assignment()
        drained = self._aligner is None or self._aligner.buffered == 0
        return bool(assigned) and drained and all(self.at_end(*tp) for tp in assigned)

    # --- per batch: what StreamRunner.run_once does ---------------------------------------------

    def _decode(self, records: Records) -> list[Event]:
        events: list[Event] = []
        append, pending, specs, decode = events.append, self._pending, self._specs, self.serde.decode
        new_event, limit = _new_event, self.message_limit
        for tp_records in records:
            last = tp_records[-1]
            spec = specs[last.topic]
            logical, event_type = spec.logical, spec.event_type
            for rec in tp_records:
                value = rec.value
                if value is None:
                    continue  # a tombstone: no processor here reads deletions (as the native consumer)
                too_large = oversized(rec.key, value, rec.headers, limit)
                if too_large is not None:
                    self.dead_letter(_event(logical, event_type, rec, {}), too_large)
                    continue
                try:
                    _, record = decode(value, event_type)
                except DecodeError as exc:
                    self.dead_letter(_event(logical, event_type, rec, {}), exc)
                    continue
                raw = rec.headers  # aiokafka's (str, bytes | None) pairs
                headers = dict(raw) if raw else {}  # the usual case, inline: _event's, per record
                if None in headers.values():
                    headers = _headers(raw)
                append(new_event(
                    logical, rec.partition, rec.offset, rec.key, event_type, record, headers,
                    rec.timestamp, value, False,
                ))  # fmt: skip
            pending[(last.topic, last.partition)] = last.offset + 1
        return events

    def step(self, records: Records) -> None:
        """Handle one batch of fetched records (empty when idle). Runs on the app's loop without
        awaiting: never interleaved with another batch."""
        if self._closed or self.error is not None:
            return
        try:
            polled = self._decode(records)
            if self._aligner is None:
                events, positions = polled, self.pending()
            else:
                events, positions = self._aligner.release(polled)
            if events or positions:
                watch = getattr(self.processor, "watch", None)
                if watch is not None:  # the partitions whose watermarks matter (processors.features)
                    watch({(self._specs[t].logical, p) for t, p in self.assignment()})
                effects = self.processor.handle(events, int(self._clock() * 1000))
                send = self.producer.send
                for topic, record in effects.outputs:
                    send(topic, record)
                for event, error in effects.rejected:
                    self.dead_letter(event, error)
                self.processed += len(events)
                self._uncommitted.update(positions)
                self._positions.update(positions)  # a re-seek resumes where the in-memory state is
                self._gc.after_batch()  # as the native runner: the collector off the long-lived state
            if self._uncommitted and self.processor.should_flush(self._clock()):
                self._commit(self._uncommitted)
        except BaseException as exc:  # stop handling: a later batch must not build on a failed one
            self.error = exc  # raised by run(), whose caller reports it once

    def _commit(self, positions: dict[Position, int]) -> None:
        """Blocks the loop (a flush takes ms); Faust's consumer fetches and heartbeats on its own thread."""
        for event, error in self.processor.flush_effects() or ():
            self.dead_letter(event, error)
        self.producer.flush()  # outputs and dead letters acknowledged before the positions pass them
        self.state.commit(self.processor.state_changes(), positions)
        self._positions.update(positions)
        self._durable.update(positions)
        self._uncommitted = {}
        self.batches += 1

    def dead_letter(self, event: Event, error: BaseException) -> None:
        """What ``streams.consumer.EventConsumer.dead_letter`` does, on our producer."""
        self.letters.send(
            self.catalog.name(event.topic), event.partition, event.offset, error, event.key, event.value,
            event.headers,
        )  # fmt: skip
        self.dead_lettered += 1

    @property
    def dead_letters_lost(self) -> int:
        return self.letters.lost

    # --- lifecycle --------------------------------------------------------------------------------

    def run(
        self, stop: threading.Event, *, until_caught_up: bool = False, inputs_done: InputsDone | None = None
    ) -> None:
        """Run the Faust app on a loop of this thread until ``stop`` (or, ``until_caught_up``, drained
        once ``inputs_done`` says the processors writing to the inputs have finished and were read)."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._run(stop, until_caught_up, inputs_done))
        finally:
            asyncio.set_event_loop(None)
            loop.close()
        if self.error is not None:
            raise HeadwaterError(f"{type(self.error).__name__}: {self.error}") from self.error

    async def _run(
        self, stop: threading.Event, until_caught_up: bool, inputs_done: InputsDone | None
    ) -> None:
        app = self._app = faust_app(self.settings, self.processor.name, self)
        # Subscribed without an agent: the consumer hands fetched batches to ``step`` itself.
        app.topics.add(app.topic(*self._specs, key_serializer="raw", value_serializer="raw"))

        async def idle() -> None:  # held events and commits progress between fetched batches
            self.step([])

        app.timer(IDLE_INTERVAL_S, name=f"{self.processor.name}-idle")(idle)
        log.info("%s: starting Faust app on %s", self.processor.name, list(self._specs))
        await app.start()
        join_deadline = time.monotonic() + JOIN_TIMEOUT_S
        try:
            while not stop.is_set() and self.error is None:
                if app.crashed or app.consumer.crashed:  # e.g. a fatal group join error: fail, not hang
                    self.error = HeadwaterError(
                        f"Faust stopped: {app.crash_reason or app.consumer.crash_reason}"
                    )
                elif until_caught_up and self.caught_up() and reached(inputs_done, self._positions):
                    break
                elif until_caught_up and not self.assignment() and time.monotonic() > join_deadline:
                    self.error = HeadwaterError(
                        f"no partition of {list(self._specs)} assigned within {JOIN_TIMEOUT_S:.0f} s: "
                        f"is the broker up, or another member of group {app.conf.id} holding them?"
                    )
                await asyncio.sleep(self.poll_timeout_s)
            # No await from here to the commit: no batch can run in between. Whatever Faust
            # delivers later is not handled, so it replays from the committed positions.
            self._closed = True
            if self.error is None:
                if self._aligner is None:
                    self._commit({**self._uncommitted, **self.pending()})
                elif self._uncommitted:
                    self._commit(self._uncommitted)
        finally:
            await app.stop()

    def close(self) -> None:
        try:
            self.producer.close()
        finally:
            self.state.close()


def _tp(topic: str, partition: int) -> TP:
    return cast(TP, TopicPartition(topic, partition))


def _headers(raw: Iterable[tuple[str, Any]]) -> dict[str, bytes]:
    """The native consumer's headers: the last value of a repeated key, None values left out."""
    return {k: v.encode() if isinstance(v, str) else v for k, v in raw if v is not None}


def _event(logical: str, event_type: str, rec: ConsumerRecord[bytes, bytes], record: dict[str, Any]) -> Event:
    value = rec.value
    return _new_event(
        logical, rec.partition, rec.offset, rec.key, event_type, record, _headers(rec.headers or ()),
        rec.timestamp, value, value is None,
    )  # fmt: skip
