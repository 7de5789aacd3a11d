"""The event log and its sender process, against the real broker: what is submitted arrives
byte for byte, closing flushes, and a sender that dies is counted and replaced."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import numpy as np
import pytest

from headwater.settings import Settings
from serving.event_log import EventLog
from serving.events import PredictionEncoder, prediction_header
from serving.metrics import ServingMetrics
from streams.consumer import Event, EventConsumer
from streams.serde import Serde
from tests.serving.test_units import COLUMNS, SETS, batch, record
from tests.waiting import wait_for


def read(settings: Settings, serde: Serde, until: Callable[[list[Event]], bool]) -> list[Event]:
    events: list[Event] = []
    with EventConsumer(settings, serde, ["predictions"], name="test-event-log") as consumer:
        wait_for(lambda: events.extend(consumer.poll(500, 0.2)) or until(events), 30, "prediction events")
    return events


@pytest.fixture()
def encoder(serde: Serde) -> PredictionEncoder:
    return PredictionEncoder(prediction_header(serde.writer_schema("prediction").fingerprint), COLUMNS, SETS)


def test_submitted_batches_arrive_as_the_serde_encodes_them_and_close_flushes(
    settings: Settings, serde: Serde, encoder: PredictionEncoder
) -> None:
    metrics = ServingMetrics()
    log = EventLog(settings, metrics, capacity=1_000).start()
    sender = log._sender
    assert sender is not None
    rng = np.random.default_rng(1)
    batches = [
        batch(rng, n, prediction_ids=[f"b{k}-{i}" for i in range(n)]) for k, n in enumerate((1, 7, 40))
    ]
    assert all(log.submit(encoder, b) for b in batches)
    log.close()
    assert sender.proc.returncode == 0  # it flushed and ended by itself
    assert (log.sent, log.failed, log.dropped, log.backlog) == (48, 0, 0, 0)
    assert metrics.events_sent._value.get() == 48
    events = read(settings, serde, lambda got: len(got) >= 48)
    by_id = {e.record["prediction_id"]: e for e in events}
    for b in batches:
        for i, pid in enumerate(b.prediction_ids):
            assert by_id[pid].value == serde.encode("prediction", record(b, i))
            assert by_id[pid].key == b.entity_keys[i].encode()
            assert by_id[pid].headers["event_type"] == b"prediction"


def test_a_sender_that_dies_is_counted_and_replaced(
    settings: Settings, serde: Serde, encoder: PredictionEncoder
) -> None:
    metrics = ServingMetrics()
    log = EventLog(settings, metrics, capacity=1_000, restart_interval_s=0.0).start()
    try:
        rng = np.random.default_rng(2)
        first = log._sender
        assert first is not None
        assert log.submit(encoder, batch(rng, 5, prediction_ids=[f"before-{i}" for i in range(5)]))
        wait_for(lambda: log.sent == 5, 20, "the first batch to be delivered")
        os.kill(first.proc.pid, signal.SIGSTOP)  # it stops reading: the next batch waits in its pipe
        assert log.submit(encoder, batch(rng, 4, prediction_ids=[f"lost-{i}" for i in range(4)]))
        wait_for(lambda: not log._pending and not log._batches, 20, "the batch to be written to the pipe")
        os.kill(first.proc.pid, signal.SIGKILL)
        wait_for(lambda: log._sender is not first and log._sender is not None, 20, "a new sender")
        assert first.proc.returncode == -signal.SIGKILL
        assert (log._lost, log.failed, log.backlog) == (4, 4, 0)
        assert metrics.events_dropped.labels("sender")._value.get() == 4
        # The new process learns the encoder again: later batches arrive whole.
        assert log.submit(encoder, batch(rng, 3, prediction_ids=[f"after-{i}" for i in range(3)]))
        wait_for(lambda: log.sent == 8, 20, "the batch after the restart to be sent")
    finally:
        log.close()
    ids = {e.record["prediction_id"] for e in read(settings, serde, lambda got: len(got) >= 8)}
    assert ids == {*(f"before-{i}" for i in range(5)), *(f"after-{i}" for i in range(3))}


def test_an_event_over_the_message_limit_is_counted_and_the_sender_goes_on(
    settings: Settings, serde: Serde, encoder: PredictionEncoder
) -> None:
    metrics = ServingMetrics()
    log = EventLog(settings, metrics, capacity=1_000, producer_config={"message.max.bytes": 20_000}).start()
    sender = log._sender
    assert sender is not None
    rng = np.random.default_rng(3)
    keys = ["u1|i1", "u" * 30_000, "u2|i2"]  # the middle one cannot be produced
    assert log.submit(encoder, batch(rng, 3, prediction_ids=["a", "big", "b"], entity_keys=keys))
    assert log.submit(encoder, batch(rng, 2, prediction_ids=["c", "d"]))
    log.close()
    assert sender.proc.returncode == 0  # it never died
    assert (log.sent, log.failed, log.backlog) == (4, 1, 0)
    assert log.losses()["too_large"] == 1 and metrics.events_dropped.labels("too_large")._value.get() == 1
    ids = {e.record["prediction_id"] for e in read(settings, serde, lambda got: len(got) >= 4)}
    assert ids == {"a", "b", "c", "d"}
