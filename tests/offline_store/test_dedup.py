"""Each event once, wherever the lake is read.

Copies of an event share its id: a client that retries publishes its event again, and a
processor that crashes after producing and before committing produces its updates again when
it restarts (possibly with a later write time). The lake sink archives both copies, at two
offsets, in real lake files; every reader shows the first written copy only.
"""

from __future__ import annotations

import json
import random
import threading
from typing import Any

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from batch.offline_store import OfflineStore, get_historical_features, open_offline_store
from headwater.cli.features import register
from headwater.settings import Settings
from processors.lake import LakeReader, LakeWriter, event_columns
from processors.worker import run_processors
from streams.catalog import SchemaCatalog
from streams.producer import EventProducer
from streams.serde import Serde
from tests.offline_store.conftest import T0, click, feature_update


def _copy(record: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """Another copy of ``record``: the same event id, whatever else a replay changed."""
    return {**record, **changes}


def test_every_topic_names_the_field_that_identifies_its_events(catalog: SchemaCatalog) -> None:
    ids = {
        t: event_columns(t, catalog.latest(t).raw).id_field
        for t in ("click", "feature_update", "prediction", "model_event", "dead_letter")
    }
    assert ids == {
        "click": "event_id",
        "feature_update": "event_id",
        "prediction": "prediction_id",
        "model_event": "event_id",
        "dead_letter": "event_id",
    }


def test_views_show_each_event_once_the_first_written(store: OfflineStore, writer: LakeWriter) -> None:
    first = click(1)
    writer.write("clicks", [(0, 0, first), (0, 1, click(2))])
    # The client retried click 1 (a later batch, so a later ingest time), in its partition and,
    # after a repartitioning, in another; the retries carry another position to tell them apart.
    writer.write("clicks", [(0, 2, _copy(first, position=3)), (0, 3, click(3))])
    writer.write("clicks", [(1, 0, _copy(first, position=2))])
    rows = store.query("SELECT event_id, position FROM clicks ORDER BY event_id").to_pylist()
    assert rows == [
        {"event_id": "c1", "position": first["position"]},
        {"event_id": "c2", "position": 3},
        {"event_id": "c3", "position": 1},
    ]
    everything = store.relation("clicks", deduplicated=False)
    assert store.query(f"SELECT count() AS n FROM {everything}").column("n").to_pylist() == [5]

    update = feature_update("u", "a", T0, T0 + 10, {"x": 1})
    writer.write("feature-updates", [(0, 0, update)])
    writer.write("feature-updates", [(0, 1, _copy(update, write_time=T0 + 900))])  # the replay
    got = store.query("SELECT event_id, write_time, `u:x` AS x FROM feature_updates").to_pylist()
    assert got == [{"event_id": update["event_id"], "write_time": T0 + 10, "x": 1}]


def test_training_sets_read_each_update_once(store: OfflineStore, writer: LakeWriter) -> None:
    update = feature_update("u", "a", T0 + 100, T0 + 110, {"x": 1})
    other = feature_update("u", "b", T0 + 100, T0 + 110, {"x": 5})  # same times, another entity
    writer.write("feature-updates", [(0, 0, update), (0, 1, other)])
    # The processor restarts and produces the update again, later; its values even differ
    # (a nondeterministic replay): the first written copy is the one read.
    writer.write("feature-updates", [(0, 2, _copy(update, write_time=T0 + 500, values={"x": 99}))])
    # A correction of the same event time (another event id) written later is a new value.
    correction = feature_update("u", "a", T0 + 100, T0 + 700, {"x": 2}, n=1)
    writer.write("feature-updates", [(0, 3, correction)])
    labels = pd.DataFrame(
        {"entity_key": ["a", "a", "a", "b"], "label_time": [T0 + 200, T0 + 600, T0 + 800, T0 + 600]}
    )
    got = get_historical_features(store, labels, ["u:x"], include_timestamps=True)
    assert list(got["u:x"]) == [1, 1, 2, 5]
    assert list(got["u:write_time"]) == [T0 + 110, T0 + 110, T0 + 700, T0 + 110]
    got = get_historical_features(store, labels, ["u:x"], bitemporal=False, include_timestamps=True)
    assert list(got["u:x"]) == [2, 2, 2, 5]  # event time only: the correction is the latest write


def _reference(updates: list[tuple[int, dict[str, Any]]], entity: str, t: int, bitemporal: bool) -> Any:
    """Brute force: each event id's lowest offset, then the best eligible update."""
    first: dict[str, tuple[int, dict[str, Any]]] = {}
    for offset, u in updates:
        first.setdefault(u["event_id"], (offset, u))
    eligible = [
        (u["event_time"], u["write_time"], offset, u["values"]["x"])
        for offset, u in first.values()
        if u["entity_key"] == entity and u["event_time"] <= t and (not bitemporal or u["write_time"] <= t)
    ]
    return max(eligible)[3] if eligible else None


def test_random_histories_with_copies_and_corrections_match_a_reference(
    store: OfflineStore, writer: LakeWriter
) -> None:
    rng = random.Random(11)
    updates: list[tuple[int, dict[str, Any]]] = []
    offset = 0
    for batch in range(8):
        rows = []
        for n in range(60):
            if updates and rng.random() < 0.25:  # a copy of an earlier update, maybe altered
                _, u = rng.choice(updates)
                u = _copy(u, write_time=u["write_time"] + rng.choice([0, 1, 300]), values={"x": -offset})
            else:  # event times collide across and within entities: corrections and coincidences
                event = T0 + rng.randrange(0, 40)
                u = feature_update(
                    "u", f"e{rng.randrange(6)}", event, event + rng.randrange(0, 50), {"x": offset}
                )
                u["event_id"] = f"id{batch}-{n}"
            rows.append((0, offset, u))
            updates.append((offset, u))
            offset += 1
        writer.write("feature-updates", rows)
    labels = pd.DataFrame(
        [(f"e{rng.randrange(7)}", T0 + rng.randrange(-5, 400)) for _ in range(500)],
        columns=["entity_key", "label_time"],
    )
    for bitemporal in (True, False):
        got = get_historical_features(store, labels, ["u:x"], bitemporal=bitemporal)["u:x"]
        want = [_reference(updates, e, t, bitemporal) for e, t in labels.itertuples(index=False)]
        assert [None if v is pd.NA else v for v in got] == want, f"bitemporal={bitemporal}"


def test_the_lake_reader_replays_each_event_once(
    lake_settings: Settings, writer: LakeWriter, catalog: SchemaCatalog
) -> None:
    a, b = feature_update("u", "a", T0, T0, {"x": 1}), feature_update("u", "a", T0 + 5, T0 + 5, {"x": 2})
    writer.write("feature-updates", [(0, 0, a), (0, 1, b)])
    writer.write(
        "feature-updates", [(0, 2, _copy(b, write_time=T0 + 50)), (0, 3, _copy(a, write_time=T0 + 60))]
    )
    reader = LakeReader(lake_settings, catalog)
    assert [(r.offset, r.record["write_time"]) for r in reader.iter_records("feature-updates")] == [
        (0, T0),
        (1, T0 + 5),
    ]
    (latest,) = reader.latest_records("feature-updates")
    assert (latest.offset, latest.record) == (1, b)
    assert reader.read_topic("feature-updates").num_rows == 4  # every archived row, for inspection


def test_describe_counts_each_update_once(lake_settings: Settings, writer: LakeWriter) -> None:
    updates = [
        {
            **feature_update("user_activity", f"u{i % 3}", T0 + i, T0 + i, {"clicks_24h": i}),
            "event_id": f"e{i}",
        }
        for i in range(6)
    ]
    writer.write("feature-updates", [(0, i, u) for i, u in enumerate(updates)])
    replayed = [_copy(u, write_time=u["write_time"] + 1000, values={"clicks_24h": 100}) for u in updates[3:]]
    writer.write("feature-updates", [(0, 6 + i, u) for i, u in enumerate(replayed)])

    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """Stands in for the real root callback."""

    register(app)
    result = CliRunner().invoke(app, ["features", "describe", "user_activity", "--json"], obj=lake_settings)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["offline"]["rows"], out["offline"]["entities"]) == (6, 3)
    assert out["offline"]["last_write"] == T0 + 5
    (clicks,) = [f for f in out["features"] if f["name"] == "clicks_24h"]
    assert (clicks["rows"], clicks["mean"]) == (6, pytest.approx(2.5))  # copies' 100s are not counted


def test_copies_through_the_broker_and_the_lake_sink_are_read_once(settings: Settings, serde: Serde) -> None:
    """End to end: a client publishes a click twice, a processor produces an update twice; the
    real lake sink archives all four records, and SQL and training sets see two events."""
    retried = click(7)
    update = feature_update("u", "a", T0, T0 + 10, {"x": 1})
    with EventProducer(settings, serde) as producer:
        for record in (retried, retried):
            producer.send("clicks", record)
        producer.send("feature-updates", update)
        producer.send("feature-updates", _copy(update, write_time=T0 + 99))
        producer.flush()
    run_processors(settings, ["lake-sink"], threading.Event(), until_caught_up=True)
    with open_offline_store(settings) as store:
        archived = store.relation("clicks", deduplicated=False)
        counts = store.query(
            f"SELECT (SELECT count() FROM {archived}) AS archived, (SELECT count() FROM clicks) AS seen"
        )
        assert counts.to_pylist() == [{"archived": 2, "seen": 1}]
        labels = pd.DataFrame({"entity_key": ["a"], "label_time": [T0 + 200]})
        got = get_historical_features(store, labels, ["u:x"], include_timestamps=True)
    assert (list(got["u:x"]), list(got["u:write_time"])) == ([1], [T0 + 10])
