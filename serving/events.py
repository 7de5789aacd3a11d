"""Prediction events, encoded a request at a time off the request path.

The request path hands over one :class:`PredictionBatch` per call (the model's input matrix,
per-entity outputs, event times per feature set): O(1) work for the handler. The event log
(:mod:`serving.event_log`) passes it to its sender process (:mod:`serving.event_sender`),
which turns it into one ``prediction`` event per entity.

Why a dedicated encoder: fastavro takes ~200 µs and the generic compiled fast path
(:mod:`streams.fastpath`) ~80 µs for a prediction with 50 features, more than a whole
request's budget. Within one model version, the features block is the same bytes every time
except the values, their event times and the defaulted flags: :class:`PredictionEncoder`
precomputes that block's static bytes once per layout (which feature sets were found, and
the varint length of their event times) and fills the variable bytes of all the entities of
a request with a few numpy operations. The output is byte-identical to ``Serde.encode``
(tests/serving/test_units.py holds it to that), so every consumer reads it as usual.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streams.fastpath import _varint
from streams.serde import MAGIC

__all__ = ["PredictionBatch", "PredictionEncoder", "prediction_header"]

_DOUBLE = struct.Struct("<d").pack
_NULL = b"\x00"
_LITTLE = sys.byteorder == "little"


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


class PredictionEncoder:
    """Avro bodies of ``prediction`` events for one model version's columns.

    ``column_groups[j]`` is the index of the stored feature set column ``j`` comes from
    (its event time is that set's), or ``-1`` for request fields and on-demand outputs
    (no event time).
    """

    def __init__(self, header: bytes, columns: Sequence[str], column_groups: Sequence[int]) -> None:
        self.header = header  # MAGIC + fingerprint of the writer schema
        self.columns = list(columns)
        self.column_index = {c: j for j, c in enumerate(self.columns)}
        self.groups = np.asarray(column_groups, dtype=np.int64)
        self.n_groups = int(self.groups.max(initial=-1)) + 1
        self._names = [_string(c) for c in self.columns]
        self._count = _varint(len(self.columns)) if self.columns else b""
        self._layouts: dict[tuple[int, ...], _Layout] = {}

    def encode(self, batch: PredictionBatch) -> list[bytes]:
        """One single-object-encoded event per entity of ``batch``, in order.

        Per entity only what differs is built (id, key, features block, score, label); the
        rest is joined once per batch. ~1 us an entity: 100 events cost less than their
        ``produce`` calls.
        """
        n = len(batch.entity_keys)
        blocks = self._feature_blocks(batch, n)
        name, ref = _string(batch.model_name), _string(batch.model_ref)
        client = _opt_string(batch.client_id)
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
        labels: dict[str | None, bytes] = {}
        out = []
        for i, score, label, ranked in zip(
            range(n), batch.scores, batch.labels, batch.ranked_items, strict=True
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
                        blocks[i],
                        _NULL if score is None else b"\x02" + _DOUBLE(score),
                        label_bytes,
                        _NULL,  # end of ranked_items (or the empty array)
                        tail,
                    )
                )
            )
        return out

    def _feature_blocks(self, batch: PredictionBatch, n: int) -> list[bytes]:
        """The encoded ``features`` array of each entity."""
        if not self.columns:
            return [_NULL] * n
        times = batch.times
        if n == 1:  # the common single-entity call: plain Python beats numpy's per-call overhead
            return [
                self._one_block(
                    batch.X[0].tolist(), times[0].tolist() if times.size else [], batch.defaulted[0]
                )
            ]
        # Per entity and group: 0 when the row was not found (null), else the varint's length.
        lengths = _varint_lengths(times) if times.size else np.zeros((n, 0), np.int64)
        blocks: list[bytes] = [b""] * n
        keys = [tuple(row) for row in lengths.tolist()]
        by_layout: dict[tuple[int, ...], list[int]] = {}
        for i, key in enumerate(keys):
            by_layout.setdefault(key, []).append(i)
        matrix = np.ascontiguousarray(batch.X, dtype=np.float64)
        for key, rows in by_layout.items():
            layout = self._layouts.get(key)
            if layout is None:
                layout = self._layouts[key] = _Layout(self, key)
            idx = np.asarray(rows, dtype=np.int64)
            defaulted = [batch.defaulted[i] for i in rows]
            encoded = layout.fill(matrix[idx], times[idx] if times.size else times, defaulted)
            for i, block in zip(rows, encoded, strict=True):
                blocks[i] = block
        return blocks

    def _one_block(self, x: list[float], times: list[int], defaulted: list[int]) -> bytes:
        ets = [b"\x02" + _varint(t) if t >= 0 else _NULL for t in times]
        key = tuple(len(e) - 1 if len(e) > 1 else 0 for e in ets)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = _Layout(self, key)
        return layout.fill_one(x, ets, defaulted)


class _Layout:
    """The features block for one pattern of found feature sets and event-time lengths."""

    def __init__(self, encoder: PredictionEncoder, lengths: tuple[int, ...]) -> None:
        self.lengths = lengths
        static = bytearray(encoder._count)
        value_at, time_at, flag_at = [], [], []
        for j, name in enumerate(encoder._names):
            static += name
            static += b"\x06"  # the value union's "double" branch
            value_at.append(len(static))
            static += bytes(8)
            g = int(encoder.groups[j])
            length = lengths[g] if g >= 0 else 0
            if length:
                static += b"\x02"  # event_time: the union's "long" branch
                time_at.append((len(static), g, length))
                static += bytes(length)
            else:
                static += _NULL
            flag_at.append(len(static))
            static += b"\x00"
        static += _NULL  # end of the array
        self._init_struct(encoder)
        self.size = len(static)
        self.static = np.frombuffer(bytes(static), dtype=np.uint8)
        self.value_pos = (np.asarray(value_at, np.int64)[:, None] + np.arange(8)).ravel()
        self.flag_pos = np.asarray(flag_at, np.int64)
        # Event-time bytes: for each (position, group, length) byte k of the varint of that group.
        self.time_pos = np.asarray([p + k for p, _g, ln in time_at for k in range(ln)], np.int64)
        self.time_src = np.asarray([g * 10 + k for _p, g, ln in time_at for k in range(ln)], np.int64)

    def _init_struct(self, encoder: PredictionEncoder) -> None:
        """The single-entity path: one ``struct`` pack of static chunks and the values."""
        m = len(encoder.columns)
        groups = [int(g) for g in encoder.groups]
        # After value j: its event time (per entity), its flag, then the next name and branch.
        self.mids = [b"\x00" + (encoder._names[j + 1] + b"\x06" if j + 1 < m else _NULL) for j in range(m)]
        self.col_groups = groups
        self.first = encoder._count + encoder._names[0] + b"\x06"
        # Each chunk: the event-time bytes (union branch + varint, or null), then the mid bytes.
        time_bytes = [self.lengths[g] + 1 if g >= 0 and self.lengths[g] else 1 for g in groups]
        fmt = f"<{len(self.first)}s" + "".join(
            f"d{t + len(mid)}s" for t, mid in zip(time_bytes, self.mids, strict=True)
        )
        self.pack = struct.Struct(fmt).pack
        self.n_args = 2 * m + 1

    def fill_one(self, x: list[float], ets: list[bytes], defaulted: list[int]) -> bytes:
        ets = [*ets, _NULL]  # group -1 (no event time) reads the last: null
        chunks = [ets[g] + mid for g, mid in zip(self.col_groups, self.mids, strict=True)]
        for j in defaulted:
            chunks[j] = ets[self.col_groups[j]] + b"\x01" + self.mids[j][1:]
        args: list[object] = [None] * self.n_args
        args[0] = self.first
        args[1::2] = x
        args[2::2] = chunks
        return self.pack(*args)

    def fill(self, matrix: np.ndarray, times: np.ndarray, defaulted: list[list[int]]) -> list[bytes]:
        n = matrix.shape[0]
        block = np.tile(self.static, (n, 1)) if n > 1 else self.static.copy()[None, :]
        values = matrix.view(np.uint8) if _LITTLE else matrix.astype("<f8").view(np.uint8)
        block[:, self.value_pos] = values.reshape(n, -1)
        if self.time_pos.size:
            block[:, self.time_pos] = _varint_bytes(times).reshape(n, -1)[:, self.time_src]
        for i, cols in enumerate(defaulted):
            if cols:
                block[i, self.flag_pos[cols]] = 1
        raw = block.tobytes()
        size = self.size
        return [raw[i * size : (i + 1) * size] for i in range(n)]


# Smallest zigzag value needing k + 1 varint bytes, k = 1..9.
_VARINT_STEPS = np.asarray([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)
_SHIFTS = np.arange(10, dtype=np.uint64) * np.uint64(7)


def _zigzag(times: np.ndarray) -> np.ndarray:
    t = times.astype(np.int64, copy=False)
    return ((t << 1) ^ (t >> 63)).view(np.uint64)


def _varint_lengths(times: np.ndarray) -> np.ndarray:
    """Avro varint length of each time (0 for a missing one, ``< 0``)."""
    length = np.searchsorted(_VARINT_STEPS, _zigzag(times), side="right") + 1
    length[times < 0] = 0
    return length


def _varint_bytes(times: np.ndarray) -> np.ndarray:
    """Avro varint bytes of each time, 10 per value (its length given by :func:`_varint_lengths`)."""
    z = _zigzag(times)[..., None] >> _SHIFTS
    out = (z & np.uint64(0x7F)).astype(np.uint8)
    out[z >= np.uint64(0x80)] |= np.uint8(0x80)  # another byte follows
    return np.asarray(out)


def prediction_header(fingerprint: bytes) -> bytes:
    """The single-object-encoding header of a prediction event."""
    return MAGIC + fingerprint
