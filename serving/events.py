"""Prediction events, encoded a request at a time off the request path.

The request path hands over one :class:`PredictionBatch` per call (the model's input matrix,
per-entity outputs, event times per feature set): O(1) work for the handler. The event log
(:mod:`serving.event_log`) passes it to its sender process (:mod:`serving.event_sender`),
which turns it into one ``prediction`` event per entity.

Why a dedicated encoder: fastavro takes ~200 µs and the generic compiled fast path
(:mod:`streams.fastpath`) ~80 µs for a prediction with 50 features, more than a whole
request's budget. Since v2 the event carries the model's input row positionally (an Avro
array of doubles is the row's bytes as numpy holds them) and one event time per feature set,
so an event differs from the next only in a few fields: :class:`PredictionEncoder` builds
those per entity and joins the rest once per batch. The output is byte-identical to
``Serde.encode`` (tests/serving/test_units.py holds it to that), so every consumer reads it
as usual.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streams.fastpath import _varint
from streams.serde import MAGIC

__all__ = ["PredictionBatch", "PredictionEncoder", "named_features", "prediction_header"]

_DOUBLE = struct.Struct("<d").pack
_NULL = b"\x00"


def _string(s: str) -> bytes:
    b = s.encode()
    return _varint(len(b)) + b


def _opt_string(s: str | None) -> bytes:
    return _NULL if s is None else b"\x02" + _string(s)


@dataclass(slots=True)
class PredictionBatch:
    """What one call decided, for the event log: one event per entity.

    ``X`` is the model input (entities x columns, float64), ``times`` the event time of each
    entity's row per stored feature set (``-1``: not found), ``defaulted`` the column indexes
    that took the spec's default, per entity.
    """

    model_name: str
    model_version: int
    model_ref: str
    client_id: str | None
    trace_id: str | None
    event_time_ms: int
    latency_us: int
    shadow: bool
    prediction_ids: list[str]
    entity_keys: list[str]
    X: np.ndarray
    times: np.ndarray  # int64, entities x feature sets
    defaulted: list[list[int]]
    scores: list[float | None]
    labels: list[str | None]
    ranked_items: list[list[str]]
    versions: list[int] | None = None  # per entity, when they differ (precomputed predictions)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled with its two matrices as raw bytes: the event log pickles every call's batch
        for its sender, and numpy's own pickling costs ~6 µs a call for the two arrays of a
        single-entity call (10x the rest); bytes and a shape cost a copy. Per-entity lists that
        are all empty travel as None (a quarter of a 100-entity batch's pickling)."""
        matrix, times = self.X, self.times
        return (
            _unpickle_batch,
            (
                self.model_name,
                self.model_version,
                self.model_ref,
                self.client_id,
                self.trace_id,
                self.event_time_ms,
                self.latency_us,
                self.shadow,
                self.prediction_ids,
                self.entity_keys,
                (matrix.dtype.str, matrix.shape, matrix.tobytes()),  # C order, whatever the layout
                (times.dtype.str, times.shape, times.tobytes()),
                self.defaulted if any(self.defaulted) else None,  # all empty: the usual case
                self.scores,
                self.labels,
                self.ranked_items if any(self.ranked_items) else None,
                self.versions,
            ),
        )


def _array(dtype: str, shape: tuple[int, ...], data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=dtype).reshape(shape)  # read-only: the encoder only reads


def _unpickle_batch(*fields: Any) -> PredictionBatch:
    values = list(fields)
    values[10], values[11] = _array(*values[10]), _array(*values[11])
    n = len(values[9])
    for at in (12, 15):  # defaulted, ranked_items: a list per entity, sent only if one is not empty
        if values[at] is None:
            values[at] = [[] for _ in range(n)]
    return PredictionBatch(*values)


class PredictionEncoder:
    """Avro bodies of ``prediction`` events (v2) for one model version's columns.

    ``feature_sets`` are the stored feature sets the version reads, in the order of the
    columns of ``PredictionBatch.times``.
    """

    def __init__(self, header: bytes, columns: Sequence[str], feature_sets: Sequence[str]) -> None:
        self.header = header  # MAGIC + fingerprint of the writer schema
        self.columns = list(columns)
        self.column_index = {c: j for j, c in enumerate(self.columns)}
        self.feature_sets = list(feature_sets)
        self._values_head = _varint(len(self.columns)) if self.columns else b""
        self._times_head = _varint(len(self.feature_sets)) if self.feature_sets else b""
        self._set_names = [_string(name) for name in self.feature_sets]

    def encode(self, batch: PredictionBatch) -> list[bytes]:
        """One single-object-encoded event per entity of ``batch``, in order.

        Per entity only what differs is built (id, key, values, event times, score, label);
        the rest is joined once per batch. The values are the input row's bytes as they are in
        memory (an Avro ``double`` is 8 little-endian bytes).
        """
        n = len(batch.entity_keys)
        name, ref = _string(batch.model_name), _string(batch.model_ref)
        client = _opt_string(batch.client_id) + _NULL  # and v1's per-name features: empty
        tail = (
            _NULL * 3  # experiment_id, variant, propensity: empty until experiments exist
            + _varint(batch.latency_us)
            + (b"\x01" if batch.shadow else b"\x00")
            + _opt_string(batch.trace_id)
        )
        event_time = _varint(batch.event_time_ms)
        header = self.header
        ids = [_string(p) for p in batch.prediction_ids]
        keys = [_string(k) for k in batch.entity_keys]
        if batch.versions is None:
            heads = [event_time + name + _varint(batch.model_version) + ref] * n
        else:
            heads = [event_time + name + _varint(v) + ref for v in batch.versions]
        values = self._values(batch.X, n)
        times = self._times(batch.times, n)
        labels: dict[str | None, bytes] = {}
        out = []
        for i, score, label, ranked, defaulted in zip(
            range(n), batch.scores, batch.labels, batch.ranked_items, batch.defaulted, strict=True
        ):
            label_bytes = labels.get(label)
            if label_bytes is None:
                label_bytes = labels[label] = _opt_string(label)
            if ranked:
                label_bytes += _varint(len(ranked)) + b"".join(_string(r) for r in ranked)
            out.append(
                b"".join(
                    (
                        header,
                        ids[i],
                        heads[i],
                        keys[i],
                        client,
                        _NULL if score is None else b"\x02" + _DOUBLE(score),
                        label_bytes,
                        _NULL,  # end of ranked_items (or the empty array)
                        tail,
                        values[i],
                        times[i],
                        _int_array(defaulted) if defaulted else _NULL,
                    )
                )
            )
        return out

    def _values(self, matrix: np.ndarray, n: int) -> list[bytes]:
        """The ``feature_values`` array of each entity: the row's float64 bytes, framed."""
        if not self.columns:
            return [_NULL] * n
        raw = np.ascontiguousarray(matrix, dtype="<f8").tobytes()
        size, head = 8 * len(self.columns), self._values_head
        return [head + raw[i * size : (i + 1) * size] + _NULL for i in range(n)]

    def _times(self, times: np.ndarray, n: int) -> list[bytes]:
        """The ``feature_event_times`` array of each entity (-1 in ``times``: not found, null)."""
        if not self.feature_sets:
            return [_NULL] * n
        names, head = self._set_names, self._times_head
        seen: dict[tuple[int, ...], bytes] = {}
        out = []
        for row in map(tuple, times.tolist()):
            block = seen.get(row)
            if block is None:
                parts = [head]
                for set_name, t in zip(names, row, strict=True):
                    parts += (set_name, b"\x02" + _varint(t) if t >= 0 else _NULL)
                parts.append(_NULL)
                block = seen[row] = b"".join(parts)
            out.append(block)
        return out


def _int_array(items: Sequence[int]) -> bytes:
    return _varint(len(items)) + b"".join(map(_varint, items)) + _NULL


def named_features(event: Mapping[str, Any], columns: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The feature values of a decoded ``prediction`` event by name, v1 or v2 alike:
    ``{name: {"value", "event_time", "defaulted"}}``.

    ``columns``: the model version's input columns (``ModelPipeline.columns`` of its artifact,
    which a replay loads anyway: its ``feature_refs``, then its request features), which name
    the positions of a v2 event's ``feature_values``. A stored feature ``set:name`` carries its
    set's event time; request fields and on-demand outputs none.
    """
    if event.get("features"):  # v1: a name per value
        return {
            f["name"]: {"value": f["value"], "event_time": f["event_time"], "defaulted": f["defaulted"]}
            for f in event["features"]
        }
    values = event.get("feature_values") or []
    if values and len(values) != len(columns):
        raise ValueError(
            f"the event holds {len(values)} values; the {len(columns)} columns given do not name them"
        )
    times = {t["feature_set"]: t["event_time"] for t in event.get("feature_event_times") or []}
    defaulted = set(event.get("defaulted_features") or [])
    return {
        column: {
            "value": value,
            "event_time": times.get(column.split(":", 1)[0]) if ":" in column else None,
            "defaulted": j in defaulted,
        }
        for j, (column, value) in enumerate(zip(columns, values, strict=True))
    }


def prediction_header(fingerprint: bytes) -> bytes:
    """The single-object-encoding header of a prediction event."""
    return MAGIC + fingerprint
