"""One scoring pass: online features in one batch read per feature set, then the model pipeline.

Synchronous and allocation-light on purpose: for a single entity the whole pass takes tens
of microseconds (LMDB reads are ~µs, the compiled trees of :mod:`models.fastpath` likewise),
far less than an executor hop costs, so the service runs it on the event loop for small
requests. The same function serves shadow versions on their own thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.pipeline import Prediction
from serving.events import PredictionBatch
from serving.metrics import ServingMetrics
from serving.online_store import FeatureValues, OnlineStore, Value
from serving.requests import Entities
from serving.runtime import FeatureRead, LoadedModel

__all__ = ["DeadlineExceeded", "Scored", "event_batch", "score_entities"]

_NO_TIMES = np.empty((0, 0), np.int64)
_NEVER = np.iinfo(np.int64).max


class DeadlineExceeded(Exception):  # noqa: N818 - a signal, mapped to DEADLINE_EXCEEDED by the service
    """The call's deadline passed between two stages: no more work for it."""


@dataclass(slots=True)
class Scored:
    """The outputs of one pass, per entity, and what the prediction events need."""

    scores: list[float | None]
    labels: list[str | None]
    ranked: list[list[str]]
    versions: list[int]  # the version that produced each output (precomputed ones may differ)
    ages_ms: list[int | None]  # age of the oldest stored feature used
    defaulted: list[list[str]]  # names that fell back to the spec's default
    X: np.ndarray
    times: np.ndarray  # event time per entity and feature set, -1: not found
    defaulted_columns: list[list[int]]
    precomputed: list[bool]


def score_entities(
    model: LoadedModel,
    entities: Entities,
    store: OnlineStore,
    metrics: ServingMetrics | None,
    *,
    now_ms: int,
    deadline: float | None,
) -> Scored:
    """Score every entity (the rows of ``entities``, when built, become the assembled rows)."""
    n = len(entities)
    if model.precomputed_set is not None:
        served = _precomputed(model, entities, store, now_ms)
        todo = [i for i in range(n) if served[i] is None]
        if not todo:
            return _only_precomputed(model, served)
        live = _live(model, entities.subset(todo), store, metrics, now_ms=now_ms, deadline=deadline)
        return _merge(model, served, todo, live)
    return _live(model, entities, store, metrics, now_ms=now_ms, deadline=deadline)


def _live(
    model: LoadedModel,
    entities: Entities,
    store: OnlineStore,
    metrics: ServingMetrics | None,
    *,
    now_ms: int,
    deadline: float | None,
) -> Scored:
    n = len(entities)
    blocks: list[Sequence[Sequence[Value]]] = []
    matrices: list[np.ndarray | None] = []
    event_times: list[list[int | None]] = []
    for read in model.reads:
        started = time.perf_counter()
        got = _read(store, read, entities.keys[read.entity_key], now_ms)
        if metrics is not None:
            metrics.observe_fetch(read.feature_set, time.perf_counter() - started)
        blocks.append(got.values)
        matrices.append(got.matrix)
        event_times.append(got.event_time_ms)
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("after the feature reads")
    pipeline = model.pipeline
    try:
        if model.columnar is None:
            raise ValueError("per-row assembly")
        columnar = model.columnar
        fields = entities.request_values(columnar.request_fields) if columnar.request_fields else None
        matrix, defaulted, defaulted_columns = columnar.assemble(blocks, fields, n, matrices)
    except (TypeError, ValueError):  # transforms, or a value that is not a number: assemble decides
        rows = entities.rows()
        for read, block in zip(model.reads, blocks, strict=True):
            refs = read.refs
            for row, values in zip(rows, block, strict=True):
                row.update(zip(refs, values, strict=True))
        matrix, defaulted = pipeline.assemble(rows)
        index = model.encoder.column_index
        defaulted_columns = [[index[c] for c in names if c in index] if names else [] for names in defaulted]
    # Rows matter to post-processing only when it ranks (by group_key): built then.
    ranks = pipeline.spec.post.kind == "rank"
    scores, labels, ranked = pipeline.post_columns(entities.rows() if ranks else (), model.scorer(matrix))
    times, ages = _times(event_times, n, now_ms)
    return Scored(
        scores,
        labels,
        ranked,
        [model.version] * n,
        ages,
        defaulted,
        matrix,
        times,
        defaulted_columns,
        [False] * n,
    )


def _read(store: OnlineStore, read: FeatureRead, ids: list[str], now_ms: int) -> FeatureValues:
    """One batch read; an entity named several times (a user with many items) is read once."""
    n = len(ids)
    if n > 1:
        if ids.count(ids[0]) == n:  # one entity for every row: one read, its row repeated
            one = store.get_values(read.feature_set, ids[:1], read.names, now_ms=now_ms, matrix=True)
            return FeatureValues(
                one.values * n,
                one.event_time_ms * n,
                None if one.matrix is None else np.repeat(one.matrix, n, axis=0),
            )
        unique = dict.fromkeys(ids)
        if len(unique) < len(ids):
            got = store.get_values(read.feature_set, list(unique), read.names, now_ms=now_ms, matrix=True)
            position = {key: i for i, key in enumerate(unique)}
            at = [position[key] for key in ids]
            values, event_times, matrix = got
            return FeatureValues(
                [values[i] for i in at], [event_times[i] for i in at], None if matrix is None else matrix[at]
            )
    return store.get_values(read.feature_set, ids, read.names, now_ms=now_ms, matrix=True)


def _times(event_times: list[list[int | None]], n: int, now_ms: int) -> tuple[np.ndarray, list[int | None]]:
    """Event times per entity and read (-1: not found), and the age of each entity's oldest."""
    if not event_times:
        return _NO_TIMES, [None] * n
    if n == 1:  # one entity: numpy's per-call overhead would be most of the work
        row = [-1 if ts[0] is None else ts[0] for ts in event_times]
        stored = [t for t in row if t >= 0]
        return np.array([row], np.int64), [now_ms - min(stored) if stored else None]
    times = np.array([[-1 if t is None else t for t in ts] for ts in event_times], np.int64).T
    found = times >= 0
    oldest = np.where(found, times, _NEVER).min(axis=1)
    ages: list[int | None] = (now_ms - oldest).tolist()
    if not found.all():
        for i in np.flatnonzero(~found.any(axis=1)).tolist():
            ages[i] = None
    return times, ages


def _precomputed(
    model: LoadedModel, entities: Entities, store: OnlineStore, now_ms: int
) -> list[tuple[Prediction, int, int | None] | None]:
    """Batch-inference outputs per entity (keyed by the spec's first entity key), None if absent."""
    assert model.precomputed_set is not None
    got = store.get_batch(
        model.precomputed_set,
        entities.keys[model.entity_keys[0]],
        ("score", "ranked_items", "model_version"),
        now_ms=now_ms,
    )
    out: list[tuple[Prediction, int, int | None] | None] = []
    for row in got:
        score, ranked, version = row.values["score"], row.values["ranked_items"], row.values["model_version"]
        if not row.found or score is None:
            out.append(None)
            continue
        items = [str(x) for x in json.loads(ranked)] if isinstance(ranked, str) and ranked else []
        label = model.pipeline.label(float(score)) if model.pipeline.spec.task == "classification" else None
        out.append((Prediction(float(score), label, items), int(version or model.version), row.age_ms))
    return out


def _only_precomputed(model: LoadedModel, served: list[tuple[Prediction, int, int | None] | None]) -> Scored:
    n = len(served)
    found = [s for s in served if s is not None]
    return Scored(
        [s[0].score for s in found],
        [s[0].label for s in found],
        [s[0].ranked_items for s in found],
        [s[1] for s in found],
        [s[2] for s in found],
        [[] for _ in range(n)],
        np.empty((n, 0)),
        _NO_TIMES,
        [[] for _ in range(n)],
        [True] * n,
    )


def _merge(
    model: LoadedModel, served: list[tuple[Prediction, int, int | None] | None], todo: list[int], live: Scored
) -> Scored:
    """Precomputed outputs where batch inference had one, live ones for the rest (in request order).

    The events of such a mixed call carry no feature vector (the bare encoder): which
    entities were computed live is in the response's versions and defaulted flags.
    """
    n = len(served)
    out = _only_precomputed(
        model, [s if s is not None else (Prediction(None, None, []), 0, None) for s in served]
    )
    for k, i in enumerate(todo):
        out.scores[i], out.labels[i], out.ranked[i] = live.scores[k], live.labels[k], live.ranked[k]
        out.versions[i] = live.versions[k]
        out.ages_ms[i] = live.ages_ms[k]
        out.defaulted[i] = live.defaulted[k]
        out.precomputed[i] = False
    out.X = np.empty((n, 0))
    return out


def event_batch(
    request: Any,
    model: LoadedModel,
    scored: Scored,
    prediction_ids: list[str],
    entities: Entities,
    *,
    now_ms: int,
    latency_us: int,
    shadow: bool,
) -> PredictionBatch:
    """The event-log batch of one scored request."""
    return PredictionBatch(
        model_name=model.name,
        model_version=model.version,
        model_ref=request.model,
        client_id=request.client_id or None,
        trace_id=request.trace_id or None,
        event_time_ms=now_ms,
        latency_us=latency_us,
        shadow=shadow,
        prediction_ids=prediction_ids,
        entity_keys=entities.labels,
        X=scored.X,
        times=scored.times,
        defaulted=scored.defaulted_columns,
        scores=scored.scores,
        labels=scored.labels,
        ranked_items=scored.ranked,
        versions=scored.versions if any(v != model.version for v in scored.versions) else None,
    )
