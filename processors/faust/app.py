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
  here: the consumer's fetch loop (``_PositionedConsumer._drain_messages``) hands aiokafka's
  records to the host as fetched, keeping what Faust's loop guarantees (no records across a
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import aiokafka
import faust
from aiokafka.codec import has_lz4
from aiokafka.structs import ConsumerRecord, TopicPartition
from faust.transport.drivers import aiokafka as faust_kafka
from faust.types import TP
from mode import ServiceT

from headwater.errors import ConfigError, HeadwaterError
from headwater.settings import Settings
from processors.runtime import Processor, _Aligner, _LongLivedObjects
from processors.state_store import Position, StateStore
from streams.broker import resolve_bootstrap
from streams.consumer import Event, EventConsumer
from streams.consumer import _event as _new_event
from streams.producer import EventProducer
from streams.serde import DecodeError, Serde
from streams.topics import TopicCatalog

__all__ = ["FaustHost"]

log = logging.getLogger(__name__)

StartOffset = Callable[[str, int], int | None]
Records = Sequence[Sequence[ConsumerRecord[bytes, bytes]]]  # per partition, in offset order
IDLE_INTERVAL_S = 0.1  # how often held events and commits progress when no batch arrives
JOIN_TIMEOUT_S = 60.0  # with ``until_caught_up``: a worker that gets no partition by then fails
FETCH_TIMEOUT_S = 1.0  # longest one wait for fetched records lasts (Faust's own loop's figure)


class _ConsumerThread(faust_kafka.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer thread, with the host's fetch wait (Faust fixes it at 1.5 s)."""

    def _create_worker_consumer(self, transport: faust_kafka.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by aiokafka's fetcher when the consumer starts, i.e. after this.
        consumer._fetch_max_wait_ms = cast(_Transport, self.transport).fetch_max_wait_ms
        return consumer


class _PositionedConsumer(faust_kafka.Consumer):
    """Faust's aiokafka consumer, seeking to the host's positions where Faust seeks to committed ones,
    handing what it fetches to the host in batches, and committing the host's durable positions."""

    def _new_consumer_thread(self) -> faust_kafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

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

    async def _drain_messages(self, fetcher: ServiceT) -> None:
        """Faust's fetch loop (``Consumer._drain_messages``) without its per-record machinery.

        Faust wraps every record in a Message and an Event, and hands each one to the agent's
        stream through the conductor with two tasks and an ``asyncio.wait``: ~4/5 of the
        engine's CPU per event. Here what a fetch returned goes to the host in batches of at
        most ``batch_size`` records, each a share of every partition's (aiokafka returns one
        partition's records before the next one's: an aligned processor would otherwise buffer
        a whole partition's fetch while waiting for the others, and pause it past its bound,
        its records fetched again). The loop yields between batches. Kept from Faust's loop: the
        flow stop of a rebalance (what was fetched and not yet handed over is dropped, to be
        fetched again from the positions the rebalance seeks to) and its read offsets (records
        before a partition's read offset, delivered after a seek back, are dropped). Nothing is
        acknowledged to Faust: its commits take the durable positions instead
        (``_filter_committable_offsets``).
        """
        transport = cast(_Transport, self.transport)
        deliver, batch_size = transport.deliver, transport.batch_size
        consumer_should_stop = cast(Any, self)._stopped.is_set
        fetcher_should_stop = cast(Any, fetcher)._stopped.is_set
        read_offset = self._read_offset
        monitor = self.app.monitor
        track_end, inbound = monitor.track_tp_end_offset, monitor.stream_inbound_time
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                records, _ = await self._wait_next_records(FETCH_TIMEOUT_S)
                await self.sleep(0)  # as Faust's loop: other tasks run between fetches
                if not records or self.should_stop or not self.flow_active:
                    continue
                batch: list[Sequence[ConsumerRecord[bytes, bytes]]] = []
                for tp, fetched in records.items():
                    first = read_offset[tp]
                    if fetched and first is not None and fetched[0].offset < first:
                        fetched = [r for r in fetched if r.offset >= first]  # noqa: PLW2901
                    if fetched:
                        read_offset[tp] = fetched[-1].offset
                        track_end(tp, self.highwater(tp))
                        inbound[tp] = time.monotonic()  # else Faust's livelock check sees an idle stream
                        batch.append(fetched)
                for chunk in _chunks(batch, batch_size) if batch else ():
                    if self.should_stop or not self.flow_active:
                        break  # the rest is fetched again from the positions a rebalance seeks to
                    deliver(chunk)
                    await asyncio.sleep(0)  # a stop, a timer, a rebalance may run between chunks
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise

    def _filter_tps_with_pending_acks(self, topics: Any = None) -> Iterator[TP]:
        return (tp for tp in self.assignment() if topics is None or tp in topics or tp.topic in topics)

    def _filter_committable_offsets(self, tps: Iterable[TP]) -> dict[TP, int]:
        """Faust's commits (lag monitoring only): the positions the state store holds, never ahead."""
        durable = cast(_Transport, self.transport).durable
        offsets: dict[TP, int] = {}
        for tp in tps:
            offset = durable.get((tp.topic, tp.partition))
            if offset is not None and self._should_commit(tp, offset):
                offsets[tp] = offset
        return offsets


class _Transport(faust_kafka.Transport):
    Consumer = _PositionedConsumer
    # Set by _faust_app before the consumer exists:
    start_offset: StartOffset
    deliver: Callable[[Records], None]
    batch_size: int
    durable: Mapping[Position, int]  # the positions committed with the state
    fetch_max_wait_ms: int


def _faust_app(settings: Settings, name: str, host: FaustHost) -> faust.App:
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
        broker_max_poll_records=None,  # all that is fetched: _drain_messages splits it into batches
        consumer_max_fetch_size=conf.faust_max_partition_fetch_bytes,
    )
    transport = _Transport(app.conf.broker_consumer, app)
    transport.start_offset = host._start_offset
    transport.deliver = host.step
    transport.batch_size = host.batch_size
    transport.durable = host._durable
    transport.fetch_max_wait_ms = conf.faust_fetch_max_wait_ms
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
        self._durable = dict(self._positions)  # what the state store holds: Faust commits these
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

    def _decode(self, records: Records) -> list[Event]:
        events: list[Event] = []
        append, pending, specs, decode = events.append, self._pending, self._specs, self.serde.decode
        new_event = _new_event
        for tp_records in records:
            last = tp_records[-1]
            spec = specs[last.topic]
            logical, event_type = spec.logical, spec.event_type
            for rec in tp_records:
                value = rec.value
                if value is None:
                    continue  # a tombstone: no processor here reads deletions (as the native consumer)
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
            log.exception("%s: batch failed", self.processor.name)
            self.error = exc

    def _commit(self, positions: dict[Position, int]) -> None:
        """Blocks the loop (a flush takes ms); Faust's consumer fetches and heartbeats on its own thread."""
        self.processor.flush_effects()
        self.producer.flush()  # outputs and dead letters acknowledged before the positions pass them
        self.state.commit(self.processor.state_changes(), positions)
        self._positions.update(positions)
        self._durable.update(positions)
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
        app = self._app = _faust_app(self.settings, self.processor.name, self)
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


def _chunks(records: Records, size: int) -> Iterator[Records]:
    """``records`` (per partition) in chunks of at most ``size``, each a share of every partition's."""
    share = max(1, size // len(records))
    longest = max(len(r) for r in records)
    for start in range(0, longest, share):
        yield [r[start : start + share] for r in records if len(r) > start]


def _headers(raw: Iterable[tuple[str, Any]]) -> dict[str, bytes]:
    """The native consumer's headers: the last value of a repeated key, None values left out."""
    return {k: v.encode() if isinstance(v, str) else v for k, v in raw if v is not None}


def _event(logical: str, event_type: str, rec: ConsumerRecord[bytes, bytes], record: dict[str, Any]) -> Event:
    value = rec.value
    return _new_event(
        logical, rec.partition, rec.offset, rec.key, event_type, record, _headers(rec.headers or ()),
        rec.timestamp, value, value is None,
    )  # fmt: skip
