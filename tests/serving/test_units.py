"""Pure parts of the service: the prediction-event encoder (byte-identical to the serde) and the limits."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

from features.repository import FeatureRepository
from models.examples.clickstream import specs
from models.fastpath import compile_scorer
from models.pipeline import ModelPipeline
from models.spec import ModelSpec
from serving.assemble import ColumnarAssembler
from serving.events import PredictionBatch, PredictionEncoder, named_features, prediction_header
from serving.limits import ClientRateLimits, InFlight, TokenBucket
from serving.scoring import _times
from streams.serde import Serde

COLUMNS = (
    [f"user_activity:f{j}" for j in range(7)]
    + [f"item_activity:g{j}" for j in range(5)]
    + ["ctr:x", "position"]
)
SETS = ["user_activity", "item_activity"]


def batch(rng: np.random.Generator, n: int, **overrides: Any) -> PredictionBatch:
    times = 1_700_000_000_000 - rng.integers(0, 10**9, size=(n, 2))
    times[rng.random((n, 2)) < 0.3] = -1  # feature sets not found for some entities
    if n > 2:
        times[2, 0] = 5  # a one-byte varint
    values = dict(
        model_name="ctr",
        model_version=3,
        model_ref="ctr@production",
        client_id="web",
        trace_id=None,
        event_time_ms=1_700_000_000_123,
        latency_us=850,
        shadow=False,
        prediction_ids=[f"p{i}" for i in range(n)],
        entity_keys=[f"u{i}|i{i}" for i in range(n)],
        X=rng.normal(size=(n, len(COLUMNS))),
        times=times,
        defaulted=[
            sorted(rng.choice(len(COLUMNS), int(rng.integers(0, 3)), replace=False).tolist())
            for _ in range(n)
        ],
        scores=[float(rng.random()) if i % 4 else None for i in range(n)],
        labels=["1" if i % 3 == 0 else None for i in range(n)],
        ranked_items=[["a", "é"] if i % 2 else [] for i in range(n)],
    )
    values.update(overrides)
    return PredictionBatch(**values)  # type: ignore[arg-type]


def record(b: PredictionBatch, i: int) -> dict[str, Any]:
    return {
        "prediction_id": b.prediction_ids[i],
        "event_time": b.event_time_ms,
        "model_name": b.model_name,
        "model_version": b.versions[i] if b.versions else b.model_version,
        "model_ref": b.model_ref,
        "entity_key": b.entity_keys[i],
        "client_id": b.client_id,
        "features": [],
        "score": b.scores[i],
        "label": b.labels[i],
        "ranked_items": b.ranked_items[i],
        "experiment_id": None,
        "variant": None,
        "propensity": None,
        "latency_us": b.latency_us,
        "shadow": b.shadow,
        "trace_id": b.trace_id,
        "feature_values": b.X[i].tolist(),
        "feature_event_times": [
            {"feature_set": name, "event_time": int(t) if t >= 0 else None}
            for name, t in zip(SETS, b.times[i], strict=True)
        ]
        if b.times.size
        else [],
        "defaulted_features": list(b.defaulted[i]),
    }


@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("seed", range(5))
def test_the_encoder_writes_the_bytes_the_serde_writes(serde: Serde, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    header = prediction_header(serde.writer_schema("prediction").fingerprint)
    encoder = PredictionEncoder(header, COLUMNS, SETS)
    b = batch(
        rng,
        n,
        shadow=bool(seed % 2),
        trace_id="t" if seed % 2 else None,
        versions=[3 + i % 2 for i in range(n)] if seed == 3 else None,
    )
    encoded = encoder.encode(b)
    for i in range(n):
        assert encoded[i] == serde.encode("prediction", record(b, i)), i
        assert serde.decode(encoded[i])[1]["prediction_id"] == b.prediction_ids[i]


@pytest.mark.parametrize("n", [1, 100])
def test_a_batch_survives_the_pipe_to_the_sender(serde: Serde, n: int) -> None:
    """What the sender encodes from a pickled batch (its matrices travel as raw bytes) is
    what the original encodes: same bytes, whatever the matrices' layout."""
    rng = np.random.default_rng(n)
    header = prediction_header(serde.writer_schema("prediction").fingerprint)
    encoder = PredictionEncoder(header, COLUMNS, SETS)
    b = batch(rng, n, versions=[3 + i % 2 for i in range(n)])
    b.X = np.asfortranarray(b.X)
    copy = pickle.loads(pickle.dumps(b, protocol=pickle.HIGHEST_PROTOCOL))
    assert copy.X.dtype == b.X.dtype and copy.times.dtype == b.times.dtype
    np.testing.assert_array_equal(copy.X, b.X)
    np.testing.assert_array_equal(copy.times, b.times)
    assert encoder.encode(copy) == encoder.encode(b)
    plain = batch(rng, 3, defaulted=[[], [], []], ranked_items=[[], [], []])
    copy = pickle.loads(pickle.dumps(plain))
    assert copy.defaulted == copy.ranked_items == [[], [], []]
    copy.defaulted[0].append(1)  # one list per entity, as sent
    assert copy.defaulted == [[1], [], []]
    empty = batch(rng, 2, X=np.empty((2, 0)), times=np.empty((0, 0), np.int64))
    assert pickle.loads(pickle.dumps(empty)).X.shape == (2, 0)


def test_an_encoder_without_features_writes_an_empty_array(serde: Serde) -> None:
    header = prediction_header(serde.writer_schema("prediction").fingerprint)
    b = batch(
        np.random.default_rng(0),
        3,
        X=np.empty((3, 0)),
        times=np.empty((0, 0), np.int64),
        defaulted=[[], [], []],
    )
    (first, *_) = PredictionEncoder(header, [], []).encode(b)
    event = serde.decode(first)[1]
    assert event["features"] == event["feature_values"] == event["feature_event_times"] == []


def test_named_features_reads_v1_and_v2_events_alike(serde: Serde) -> None:
    """A v1 event (a name per value) and the v2 event of the same decision name the same features."""
    rng = np.random.default_rng(4)
    b = batch(rng, 3)
    header = prediction_header(serde.writer_schema("prediction").fingerprint)
    for i, v2 in enumerate(PredictionEncoder(header, COLUMNS, SETS).encode(b)):
        new = record(b, i)
        old = {
            k: v
            for k, v in new.items()
            if k not in ("feature_values", "feature_event_times", "defaulted_features")
        }
        times = {t["feature_set"]: t["event_time"] for t in new["feature_event_times"]}
        old["features"] = [
            {
                "name": c,
                "value": float(b.X[i, j]),
                "event_time": times.get(c.split(":", 1)[0]) if j < 12 else None,
                "defaulted": j in b.defaulted[i],
            }
            for j, c in enumerate(COLUMNS)
        ]
        v1 = serde.encode("prediction", old, version=1)
        _, from_v1 = serde.decode(v1)  # resolved to the current schema: v2's fields take their defaults
        assert from_v1["feature_values"] == [] and len(from_v1["features"]) == len(COLUMNS)
        _, from_v2 = serde.decode(v2)
        assert named_features(from_v1, COLUMNS) == named_features(from_v2, COLUMNS)
    with pytest.raises(ValueError, match="do not name them"):
        named_features(from_v2, COLUMNS[:-1])


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.05) is False  # half a token
    assert bucket.take(0.1) is True  # one token after 0.1 s at 10/s
    assert (
        bucket.take(100.0) and bucket.take(100.0) and bucket.take(100.0) and not bucket.take(100.0)
    )  # capped


def test_client_limits_are_per_client_and_bounded() -> None:
    clock = [0.0]
    limits = ClientRateLimits(1.0, 2, max_clients=4, clock=lambda: clock[0])
    assert [limits.allow("a") for _ in range(3)] == [True, True, False]
    assert limits.allow("b")
    for i in range(10):
        limits.allow(f"c{i}")
    assert len(limits._buckets) <= 5
    assert ClientRateLimits(0.0, 1).allow("anyone")  # 0: off


def test_in_flight_refuses_past_its_limit() -> None:
    flight = InFlight(2)
    assert flight.enter() and flight.enter() and not flight.enter()
    flight.leave()
    assert flight.enter() and flight.count == 2


def test_the_serving_scorer_scores_exactly_as_the_pipeline(pipelines: list[ModelPipeline]) -> None:
    rng = np.random.default_rng(11)
    for pipeline in pipelines:
        assert pipeline.estimator is not None
        scorer = compile_scorer(pipeline.estimator, pipeline.spec.task)
        matrix = rng.integers(0, 60, (300, len(pipeline.columns))).astype(float)
        matrix[rng.random(matrix.shape) < 0.1] = np.nan  # missing values follow each node's missing direction
        matrix[:5] = np.inf
        expected = pipeline.scores(matrix)
        assert [scorer.one(row) for row in matrix.tolist()] == expected.tolist()
        for n in (1, 3, 40, 300):  # compiled rows for few, scikit-learn's tree walk for many
            assert scorer(matrix[:n]).tolist() == expected[:n].tolist()


def test_the_columnar_assembly_equals_the_pipelines(repository: FeatureRepository) -> None:
    refs = [  # interleaved: the reads (one per feature set) come back in another order
        "user_activity:clicks_24h",
        "item_activity:impressions_1h",
        "user_activity:ctr_7d",
        "item_activity:ctr_24h",
    ]
    spec = ModelSpec(
        name="plain",
        entity_keys=("user_id", "item_id"),
        features=tuple(refs),
        request_features=("position",),
        label="clicked",
        task="classification",
        estimator="logistic_regression",
        owner="tests",
        defaults={"user_activity:ctr_7d": 0.25, "position": 2},
    )
    pipeline = ModelPipeline(spec, repository)
    reads = [(fs, names) for fs, names in pipeline.reads.items()]
    assembler = ColumnarAssembler.build(pipeline, reads)
    assert assembler is not None
    values = [None, 0, 3, 2.5, float("nan"), True]
    rng = np.random.default_rng(3)
    blocks = []
    for _fs, names in reads:
        blocks.append(
            [[values[int(rng.integers(0, len(values)))] if i % 7 else None for _ in names] for i in range(40)]
        )
    rows = [
        {"user_id": "u", "item_id": "i", **({"position": values[i % 6]} if i % 5 else {})} for i in range(40)
    ]
    full_rows = [dict(row) for row in rows]
    for (fs, names), block in zip(reads, blocks, strict=True):
        for row, got in zip(full_rows, block, strict=True):
            row.update({f"{fs}:{n}": v for n, v in zip(names, got, strict=True)})
    fields = [[row.get(name) for name in assembler.request_fields] for row in rows]
    matrix, defaulted, indexes = assembler.assemble(blocks, fields, len(rows))
    want_matrix, want_defaulted = pipeline.assemble(full_rows)
    assert np.array_equal(matrix, want_matrix) and defaulted == want_defaulted
    assert indexes == [[pipeline.columns.index(c) for c in names] for names in want_defaulted]
    for i in range(7):  # one entity at a time, as most calls are
        one, one_defaulted, _ = assembler.assemble(
            [block[i : i + 1] for block in blocks], fields[i : i + 1], 1
        )
        assert np.array_equal(one, want_matrix[i : i + 1]) and one_defaulted == want_defaulted[i : i + 1]
    with_transform = next(s for s in specs() if s.name == "ctr_model")
    assert ColumnarAssembler.build(ModelPipeline(with_transform, repository), reads) is None  # per row, then


@pytest.mark.parametrize(
    "event_times",
    [[[1_000], [1_500]], [[None], [1_500]], [[None], [None]], [[700]]],
    ids=["both", "one missing", "none", "one set"],
)
def test_feature_ages_of_one_entity_equal_those_of_a_batch(event_times: list[list[int | None]]) -> None:
    """A single entity's event times and age take a path of their own (no numpy reductions):
    the same as that entity's in a batch of two."""
    now = 2_000
    one_times, one_ages = _times(event_times, 1, now)
    two_times, two_ages = _times([ts * 2 for ts in event_times], 2, now)
    np.testing.assert_array_equal(one_times, two_times[:1])
    assert one_times.dtype == np.int64
    assert one_ages == two_ages[:1]
    stored = [ts[0] for ts in event_times if ts[0] is not None]
    assert one_ages == [now - min(stored) if stored else None]
