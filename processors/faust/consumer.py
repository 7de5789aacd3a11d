"""The Faust app and consumer the Faust engine runs (:mod:`processors.faust.app`): Faust's
aiokafka consumer, seeking to the host's stored positions, handing fetched batches straight to
the host instead of through Faust's per-message streams, and committing only durable positions.
Why each of these departs from Faust's own behaviour: the module docstring of
:mod:`processors.faust.app`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import aiokafka
import faust
from aiokafka.structs import ConsumerRecord, TopicPartition
from faust.transport.drivers import aiokafka as faust_kafka
from faust.types import TP
from mode import ServiceT

from headwater.settings import Settings
from processors.state_store import Position
from streams.broker import resolve_bootstrap

if TYPE_CHECKING:
    from processors.faust.app import FaustHost

__all__ = ["PositionedConsumer", "Records", "faust_app"]

log = logging.getLogger(__name__)

StartOffset = Callable[[str, int], int | None]
Records = Sequence[Sequence[ConsumerRecord[bytes, bytes]]]  # per partition, in offset order
FETCH_TIMEOUT_S = 1.0  # longest one wait for fetched records lasts (Faust's own loop's figure)


class _ConsumerThread(faust_kafka.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer thread, with the host's fetch wait (Faust fixes it at 1.5 s)."""

    def _create_worker_consumer(self, transport: faust_kafka.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by aiokafka's fetcher when the consumer starts, i.e. after this.
        consumer._fetch_max_wait_ms = cast(_Transport, self.transport).fetch_max_wait_ms
        return consumer


class PositionedConsumer(faust_kafka.Consumer):
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
    Consumer = PositionedConsumer
    # Set by faust_app before the consumer exists:
    start_offset: StartOffset
    deliver: Callable[[Records], None]
    batch_size: int
    durable: Mapping[Position, int]  # the positions committed with the state
    fetch_max_wait_ms: int


def faust_app(settings: Settings, name: str, host: FaustHost) -> faust.App:
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


def _chunks(records: Records, size: int) -> Iterator[Records]:
    """``records`` (per partition) in chunks of at most ``size``, each a share of every partition's."""
    share = max(1, size // len(records))
    longest = max(len(r) for r in records)
    for start in range(0, longest, share):
        yield [r[start : start + share] for r in records if len(r) > start]
