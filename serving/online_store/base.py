"""The online store interface: latest feature values per (feature set, entity).

The online store keeps, per (feature set, entity), the latest values of the feature set with
the event time they are valid from, the time they were written and an optional expiry.
Writes are **newer-wins** on event time (DESIGN.md §5): an update whose event time is older
than the stored one is dropped, so late events and backfills never overwrite fresher values;
an update whose event time equals the stored one replaces it (last write wins on ties):
several updates can share an event time (events in the same millisecond; the last one
emitted holds them all, see :mod:`features.windows`), one writer applies a key's updates
in log order, and a replay rewrites identical values, so replays stay idempotent (an
update is identified by feature set, entity and event time, like the
``event_id`` of a FeatureUpdate event). Each backend compares and writes atomically, so the
rule holds with any number of concurrent writer processes.

An update replaces the whole record: it carries every feature of the feature set at that
event time, as a FeatureUpdate event does, so the latest update per key rebuilds the store.

TTL is by event time: a record written with ``ttl_s`` reads as missing from
``event time + ttl_s`` on (values describing an old moment stop being served).

Windows are read at the read's time. A windowed value written at event time t holds until
its update's ``valid_until`` (the first time a tile leaves one of its windows); a read at or
after that evaluates every window at its ``now_ms`` from the tiles stored with the record, so
an entity inactive for six days reads 0 for its last-day counts, as the window definition
says, not the count of six days ago. Reads before the record's event time read it as of that
time. Evaluation needs the feature set's definition (found by the tiles' layout id among the
feature sets this process loaded); every backend evaluates alike, in the shared codec.

Writes come as rows (``put_batch``: the stream's updates) or as an Arrow table
(``put_columns``: backfills and batch jobs writing many entities at once, encoded
column-wise); both obey the same rules.

The stored bytes are the same on every backend: see :mod:`serving.online_store.codec`.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Self

import numpy as np

from headwater.errors import HeadwaterError
from headwater.integrity import CheckReport

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "FeatureRow",
    "FeatureValues",
    "OnlineStore",
    "OnlineStoreError",
    "Row",
    "Value",
    "check_feature_set",
    "epoch_ms",
]

Value = None | bool | int | float | str
"""A feature value: what the FeatureUpdate event's value union can carry."""

Row = tuple[str, int, Mapping[str, Value]] | tuple[str, int, Mapping[str, Value], int | None, bytes | None]
"""An update to write: (entity key, event time in epoch ms, feature name -> value), optionally
followed by ``valid_until`` and the update's window tiles (see :mod:`features.engine`): from
``valid_until`` on, reads evaluate the values from the tiles at their own time."""

_FEATURE_SET_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


class OnlineStoreError(HeadwaterError):
    """An online-store write or read failed, or was given something it cannot store."""


class FeatureRow(NamedTuple):
    """What :meth:`OnlineStore.get_batch` returns for one entity.

    ``values`` has exactly the requested features, None where the feature (or the whole
    entity) is missing. For a missing or expired entity the three times are None.
    """

    values: dict[str, Value]
    event_time_ms: int | None
    write_time_ms: int | None
    age_ms: int | None  # now - event time, at the ``now_ms`` of the read

    @property
    def found(self) -> bool:
        return self.event_time_ms is not None


class FeatureValues(NamedTuple):
    """What :meth:`OnlineStore.get_values` returns: :meth:`~OnlineStore.get_batch`'s rows, column-ready.

    ``values[i]`` holds entity ``i``'s requested features in the requested order (None where
    missing; all None for a missing or expired entity), ``event_time_ms[i]`` its event time
    (None: missing or expired). Treat both as read-only: a backend may hand out shared objects.
    """

    values: list[Sequence[Value]]
    event_time_ms: list[int | None]
    # The same values as float64 (entities x features; NaN where missing), when a backend has
    # them at hand and every value is a number (None otherwise): see RecordCodec.decode_values.
    matrix: np.ndarray | None = None


def as_matrix(values: Sequence[Sequence[Value]], width: int) -> np.ndarray | None:
    """``values`` as float64 (None and NaN missing, booleans 0/1), or None if one is not a number."""
    try:
        return np.array(values, dtype=np.float64).reshape(len(values), width)
    except (TypeError, ValueError):
        return None


class OnlineStore(ABC):
    """Latest feature values per (feature set, entity); newer-wins writes, batched reads.

    Open one with :func:`serving.online_store.open_online_store`. Instances are not meant to be
    shared across ``fork``: open the store in each process.
    """

    backend: ClassVar[str]

    @abstractmethod
    def put_batch(
        self,
        feature_set: str,
        rows: Iterable[Row],
        *,
        ttl_s: float | None = None,
        write_time_ms: int | None = None,
    ) -> int:
        """Apply updates newer-wins; return how many records were written.

        ``ttl_s`` makes the written records expire ``ttl_s`` seconds after their *event* time
        (a feature set's TTL: values describing an old moment stop being served).
        ``write_time_ms`` defaults to now. Several updates of one entity in the same batch
        behave as if applied one by one: the newest wins, the last of equal ones.
        """

    def put_columns(
        self,
        feature_set: str,
        table: pa.Table,
        *,
        entity_column: str = "entity_key",
        time_column: str = "event_time",
        ttl_s: float | None = None,
        write_time_ms: int | None = None,
    ) -> int:
        """:meth:`put_batch` from an Arrow table: the bulk path of backfills and batch jobs.

        ``table`` holds the entity keys (strings), the event times (integer epoch ms, or
        timestamps) and one column per feature, named by the feature, in schema order; every
        other column is a feature, except ``_valid_until`` and ``_tiles`` (integers and binary,
        both or neither): the updates' window tiles, as in a :data:`Row`. Same semantics and
        result as ``put_batch`` with one row per table row. Backends encode the columns
        vectorised (:mod:`serving.online_store.columnar`); this default goes through ``put_batch``.
        """
        from serving.online_store.columnar import rows_of

        rows = rows_of(table, entity_column=entity_column, time_column=time_column)
        return self.put_batch(feature_set, rows, ttl_s=ttl_s, write_time_ms=write_time_ms)

    @abstractmethod
    def get_batch(
        self,
        feature_set: str,
        entity_keys: Sequence[str],
        features: Sequence[str],
        *,
        now_ms: int | None = None,
    ) -> list[FeatureRow]:
        """Read many entities in one round trip; one :class:`FeatureRow` per key, in order.

        Records expired at ``now_ms`` (default: now) read as missing.
        """

    def get_values(
        self,
        feature_set: str,
        entity_keys: Sequence[str],
        features: Sequence[str],
        *,
        now_ms: int | None = None,
        matrix: bool = False,
    ) -> FeatureValues:
        """:meth:`get_batch` as value sequences instead of dicts: the serving path, which puts
        them straight into a feature matrix. Same semantics; backends override it to skip the
        dicts (this default builds them from ``get_batch``). ``matrix``: also the values as
        float64 when all are numbers (``FeatureValues.matrix``); backends may keep the rows
        they decoded to make that cheap."""
        rows = self.get_batch(feature_set, entity_keys, features, now_ms=now_ms)
        names = tuple(features)
        values: list[Sequence[Value]] = [tuple(row.values[name] for name in names) for row in rows]
        return FeatureValues(
            values,
            [row.event_time_ms for row in rows],
            as_matrix(values, len(names)) if matrix else None,
        )

    def check(self) -> CheckReport:
        """Read every record and say what cannot be what a write stored (``headwater doctor``).

        Backends on a server (Redis, Aerospike) leave the integrity of their files to it.
        """
        report = CheckReport(f"online store ({self.backend})")
        report.warning(self.backend, "not checked here: the server keeps its own data files intact")
        return report

    @abstractmethod
    def close(self) -> None:
        """Release connections and handles; the store is unusable afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def epoch_ms() -> int:
    return time.time_ns() // 1_000_000


def check_feature_set(name: str) -> str:
    """Feature set names become key prefixes: keep them to a safe alphabet."""
    if not isinstance(name, str) or not _FEATURE_SET_RE.fullmatch(name):
        raise OnlineStoreError(
            f"invalid feature set name {name!r}: use 1-128 letters, digits, '_', '.' or '-', "
            "not starting with '.' or '-'"
        )
    return name
