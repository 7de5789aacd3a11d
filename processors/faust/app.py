"""The Faust engine: the platform's pure processors hosted by Faust agents.

Each processor gets a Faust app of its own (app id = consumer group ``headwater-<name>``, as
the native runner's) whose one agent consumes the processor's source topics as raw bytes and
hands batches to :class:`FaustHost`, which does what :class:`processors.runtime.StreamRunner`
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
  positions instead; Faust's commits remain, for lag monitoring only.
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

Why this is not the default engine: see ``processors/runtime.py`` (aiokafka consumes a small
fraction of librdkafka's rate on the embedded broker); ``benchmarks/faust_streaming.py``
measures both on the same events.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import faust
from aiokafka.codec import has_lz4
from aiokafka.structs import TopicPartition
from faust.transport.drivers import aiokafka as faust_kafka
from faust.types import TP, EventT, Message

from headwater.errors import ConfigError, HeadwaterError
from headwater.settings import Settings
from processors.runtime import Processor, _Aligner
from processors.state_store import Position, StateStore
from streams.broker import resolve_bootstrap
from streams.consumer import Event, EventConsumer
from streams.producer import EventProducer
from streams.serde import DecodeError, Serde
from streams.topics import TopicCatalog

__all__ = ["FaustHost"]

log = logging.getLogger(__name__)

StartOffset = Callable[[str, int], int | None]
IDLE_INTERVAL_S = 0.1  # how often held events and commits progress when no batch arrives
JOIN_TIMEOUT_S = 60.0  # with ``until_caught_up``: a worker that gets no partition by then fails


class _PositionedConsumer(faust_kafka.Consumer):
    """Faust's aiokafka consumer, seeking to the host's positions where Faust seeks to committed ones."""

    async def seek_to_committed(self) -> Mapping[TP, int]:
        start = cast(_Transport, self.transport).start_offset
        seeked: dict[TP, int] = {}
        for tp in self.assignment():
            offset = start(tp.topic, tp.partition)
            kafka_tp = cast(TP, TopicPartition(tp.topic, tp.partition))  # aiokafka checks its own type
            if offset is None:  # nothing processed yet: from the beginning, as the native runner
                await self._thread.seek_to_beginning(kafka_tp)
            else:
                await self._seek(kafka_tp, offset)
                seeked[tp] = offset
        log.info("%s: seeked to stored positions %s", self.app.conf.id, seeked)
        return seeked  # Faust's read offsets follow: it drops nothing at or after these


class _Transport(faust_kafka.Transport):
    Consumer = _PositionedConsumer
    start_offset: StartOffset  # set by _faust_app before the consumer exists


def _faust_app(settings: Settings, name: str, start_offset: StartOffset) -> faust.App:
    conf = settings.processors
    datadir = settings.data_dir / "faust" / name  # Faust insists on one, though it keeps no tables here
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        # The consumer group. Not the native runner's: a group keeps its members' assignment protocol
        # (librdkafka "range", aiokafka "roundrobin"), so one engine could not join the other's group;
        # positions come from the state store either way. Prefixed, as topics are, for shared brokers.
        f"{settings.topic_prefix}headwater-faust-{name}",
        broker=[f"kafka://{server}" for server in resolve_bootstrap(settings).split(",")],
        datadir=str(datadir),
        store="memory://",  # no Faust tables (see the module docstring)
        autodiscover=False,
        web_enabled=False,
        topic_allow_declare=False,
        topic_disable_leader=True,  # the leader topic would be declared with Faust's configs
        consumer_auto_offset_reset="earliest",
        # Short, as the native consumers' locally: the embedded broker's joins wait on it (DESIGN.md §3).
        broker_session_timeout=conf.faust_session_timeout_s,
        broker_heartbeat_interval=conf.faust_session_timeout_s / 3,
    )
    transport = _Transport(app.conf.broker_consumer, app)
    transport.start_offset = start_offset
    app.transport = transport
    return app


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
        self.producer = EventProducer(settings, serde, client_id=processor.name)
        self._pending: dict[Position, int] = {}  # next offset per partition of everything received
        self._uncommitted: dict[Position, int] = {}
        # The runtime's aligner asks a consumer for its assignment, partition ends and pending
        # positions; this host answers from Faust's consumer (see the methods below).
        self._aligner = (
            _Aligner(cast(EventConsumer, self), self.batch_size, max_buffered)
            if processor.event_time_aligned
            else None
        )
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
        thread = cast(_PositionedConsumer, self._app.consumer)._thread
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

    def _decode(self, messages: Iterable[Message]) -> list[Event]:
        events: list[Event] = []
        for msg in messages:
            tp = (msg.topic, msg.partition)
            self._pending[tp] = msg.offset + 1
            value = msg.value
            if value is None:
                continue  # a tombstone: no processor here reads deletions (as the native consumer)
            spec = self._specs[msg.topic]
            try:
                _, record = self.serde.decode(value, spec.event_type)
            except DecodeError as exc:
                self.dead_letter(_event(spec.logical, spec.event_type, msg, {}), exc)
                continue
            events.append(_event(spec.logical, spec.event_type, msg, record))
        return events

    def step(self, messages: Sequence[Message]) -> None:
        """Handle one batch (empty when idle). Runs on the app's loop without awaiting: never interleaved."""
        if self._closed or self.error is not None:
            return
        try:
            polled = self._decode(messages)
            if self._aligner is None:
                events, positions = polled, self.pending()
            else:
                events, positions = self._aligner.release(polled)
            if events or positions:
                effects = self.processor.handle(events, int(self._clock() * 1000))
                send = self.producer.send
                for topic, record in effects.outputs:
                    send(topic, record)
                for event, error in effects.rejected:
                    self.dead_letter(event, error)
                self.processed += len(events)
                self._uncommitted.update(positions)
                self._positions.update(positions)  # a re-seek resumes where the in-memory state is
            if self._uncommitted and self.processor.should_flush(self._clock()):
                self._commit(self._uncommitted)
        except BaseException as exc:  # stop handling: a later batch must not build on a failed one
            log.exception("%s: batch failed", self.processor.name)
            self.error = exc

    def _commit(self, positions: dict[Position, int]) -> None:
        """Blocks the loop (a flush takes ms); Faust's consumer fetches and heartbeats on its own thread."""
        self.processor.flush_effects()
        self.producer.flush()  # outputs and dead letters acknowledged before the positions pass them
        self.state.commit(self.processor.state_changes(), positions)
        self._positions.update(positions)
        self._uncommitted = {}
        self.batches += 1

    def dead_letter(self, event: Event, error: Exception) -> None:
        """The dead-letter record of ``streams.consumer.EventConsumer.dead_letter``, on our producer."""
        topic = self.catalog.name(event.topic)
        log.warning(
            "%s: dead-lettering %s [%d] @%d: %s",
            self.processor.name,
            topic,
            event.partition,
            event.offset,
            error,
        )
        self.producer.send(
            "dead-letters",
            {
                "event_id": f"{topic}/{event.partition}/{event.offset}",
                "event_time": int(time.time() * 1000),
                "source_topic": topic,
                "source_partition": event.partition,
                "source_offset": event.offset,
                "consumer": self.processor.name,
                "error_type": type(error).__name__,
                "error": str(error),
                "original_key": event.key,
                "original_value": event.value,
                "original_headers": event.headers,
            },
        )
        self.dead_lettered += 1

    # --- lifecycle --------------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, until_caught_up: bool = False) -> None:
        """Run the Faust app on a loop of this thread until ``stop`` (or, ``until_caught_up``, drained)."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._run(stop, until_caught_up))
        finally:
            asyncio.set_event_loop(None)
            loop.close()
        if self.error is not None:
            raise HeadwaterError(f"{self.processor.name} failed: {self.error}") from self.error

    async def _run(self, stop: threading.Event, until_caught_up: bool) -> None:
        app = self._app = _faust_app(self.settings, self.processor.name, self._start_offset)
        source = app.topic(*self._specs, key_serializer="raw", value_serializer="raw")

        async def consume(stream: faust.StreamT[bytes]) -> None:
            batch: Sequence[EventT[bytes]]
            async for batch in cast(faust.Stream[bytes], stream).take_events(
                self.batch_size, within=self.poll_timeout_s
            ):
                self.step([e.message for e in batch])

        async def idle() -> None:  # Faust yields no empty batches; held events and commits still progress
            self.step([])

        app.agent(source, name=f"{self.processor.name}-agent")(consume)
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
                elif until_caught_up and self.caught_up():
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


def _event(logical: str, event_type: str, msg: Message, record: dict[str, Any]) -> Event:
    raw = msg.headers
    items = raw.items() if isinstance(raw, Mapping) else raw or ()
    headers = {k: v.encode() if isinstance(v, str) else v for k, v in items if v is not None}
    return Event(
        logical, msg.partition, msg.offset, msg.key, event_type, record, headers,
        int(msg.timestamp * 1000), msg.value,
    )  # fmt: skip
