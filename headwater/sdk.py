"""The Python SDK for features, one line apart like Feast's::

    from headwater import FeatureStore
    store = FeatureStore()
    online = store.get_online_features(["user_activity:clicks_7d", "item_ctr:ctr_at_position"],
                                       [{"user_id": "cc6ca8db533a2809", "item_id": "14", "position": 2}])
    training = store.get_historical_features(labels, ["user_activity:clicks_7d", ...])

Entity rows name their keys by the feature sets' entity fields (``user_id``, ``item_id``) and
carry the request-time fields on-demand transforms need. On-demand transforms run through
:func:`features.on_demand.apply_on_demand` in both calls: one formula online and offline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import pandas as pd

from batch.offline_store import open_offline_store
from batch.offline_store.historical import get_historical_features
from features.on_demand import apply_on_demand
from features.repository import FeatureRef, FeatureRepository
from headwater.errors import HeadwaterError
from headwater.settings import Settings, load_settings
from processors.worker import load_repository
from serving.online_store import OnlineStore, open_online_store

__all__ = ["FeatureStore", "OnlineFeatures"]


@dataclass
class OnlineFeatures:
    """Values per entity row (ref -> value), and per row the age of the oldest stored feature used."""

    rows: list[dict[str, Any]]
    freshness_ms: list[int | None] = field(default_factory=list)  # None: no stored value found
    missing: list[list[str]] = field(default_factory=list)  # refs without a stored value, per row

    def to_pandas(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def _apply_transforms(resolved: Sequence[FeatureRef], rows: list[dict[str, Any]]) -> None:
    """Add each requested on-demand transform's outputs to the rows, under their refs (in place)."""
    applied: set[str] = set()
    for ref in resolved:
        if ref.transform is None or ref.owner in applied or not rows:
            continue
        applied.add(ref.owner)
        outputs = apply_on_demand(ref.transform, rows)
        for row, out in zip(rows, outputs, strict=True):
            row.update({f"{ref.owner}:{name}": out[name] for name in ref.transform.outputs})


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


class FeatureStore:
    """Online and historical feature retrieval over the configured stores."""

    def __init__(self, settings: Settings | None = None, repository: FeatureRepository | None = None) -> None:
        self.settings = settings or load_settings()
        self.repository = repository or load_repository(self.settings)
        self._online: OnlineStore | None = None

    @property
    def online_store(self) -> OnlineStore:
        if self._online is None:
            self._online = open_online_store(self.settings)
        return self._online

    def _plan(self, refs: Sequence[str]) -> tuple[list[FeatureRef], dict[str, list[str]]]:
        """Resolved refs, and the stored features to read per feature set (on-demand inputs included)."""
        resolved = self.repository.resolve_many(refs)
        stored: dict[str, list[str]] = {}
        for ref in resolved:
            if ref.transform is not None:
                needed = self.repository.resolve_many(ref.transform.feature_inputs)
            else:
                needed = [ref]
            for r in needed:
                names = stored.setdefault(r.owner, [])
                if r.name not in names:
                    names.append(r.name)
        return resolved, stored

    def get_online_features(
        self, refs: Sequence[str], entities: Sequence[Mapping[str, Any]], *, now_ms: int | None = None
    ) -> OnlineFeatures:
        """Latest values for each entity row: one batched read per feature set, then on-demand transforms."""
        resolved, stored = self._plan(refs)
        rows: list[dict[str, Any]] = [dict(e) for e in entities]
        oldest: list[int | None] = [None] * len(rows)
        missing: list[list[str]] = [[] for _ in rows]
        for fs_name, names in stored.items():
            entity = self.repository.feature_set(fs_name).entity
            keys = []
            for i, row in enumerate(entities):
                if row.get(entity) is None:
                    raise HeadwaterError(f"entity row {i} has no {entity!r}, needed by {fs_name}")
                keys.append(str(row[entity]))
            for i, got in enumerate(self.online_store.get_batch(fs_name, keys, names, now_ms=now_ms)):
                for name in names:
                    rows[i][f"{fs_name}:{name}"] = got.values[name]
                if got.age_ms is None:
                    missing[i].extend(f"{fs_name}:{n}" for n in names)
                else:
                    oldest[i] = max(oldest[i] or 0, got.age_ms)
        _apply_transforms(resolved, rows)
        wanted = [r.ref for r in resolved]
        return OnlineFeatures([{ref: row[ref] for ref in wanted} for row in rows], oldest, missing)

    def get_historical_features(
        self,
        labels: pd.DataFrame,
        refs: Sequence[str],
        *,
        bitemporal: bool = True,
        time_column: str = "label_time",
    ) -> pd.DataFrame:
        """The labels with one column per ref, point-in-time correct (:mod:`batch.offline_store.historical`).

        Each label row names its entities by the feature sets' entity fields (``user_id``, ...)
        and its time in ``time_column`` (epoch ms). By default a value counts only if both its
        event time and its write time are <= the label time; ``bitemporal=False`` drops the
        write-time condition. On-demand refs are computed from the retrieved inputs by the same
        function serving uses.
        """
        resolved, stored = self._plan(refs)
        stored_refs = [f"{fs}:{name}" for fs, names in stored.items() for name in names]
        entity_columns = {fs: self.repository.feature_set(fs).entity for fs in stored}
        for fs, column in entity_columns.items():
            if column not in labels.columns:
                raise HeadwaterError(f"labels have no {column!r} column, needed by {fs}")
        with open_offline_store(self.settings) as offline:
            frame = get_historical_features(
                offline, labels, stored_refs, bitemporal=bitemporal, time_column=time_column,
                entity_columns=entity_columns,
            )  # fmt: skip
        # The label columns, then exactly the refs asked for (on-demand inputs fetched on the side drop out).
        columns = [*labels.columns, *(r.ref for r in resolved)]
        if not any(r.transform is not None for r in resolved):
            return frame[columns]  # nothing runs per row: keep the columns (1M-row training sets)
        # Missing is None, as online: pandas' NaN would reach on-demand functions as a truthy
        # float (``clicks or 0`` is NaN), a training/serving skew.
        rows = [
            {str(k): None if _missing(v) else v for k, v in row.items()} for row in frame.to_dict("records")
        ]
        _apply_transforms(resolved, rows)
        return pd.DataFrame(rows, columns=list(dict.fromkeys([*frame.columns, *columns])))[columns]

    def close(self) -> None:
        if self._online is not None:
            self._online.close()
            self._online = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
