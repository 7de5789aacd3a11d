"""The sample clickstream: the Open Bandit Dataset's random-policy logs as Headwater events.

The data (ZOZO's Open Bandit Dataset, Apache-2.0; see ``infra/sample_data/obd/README.md``)
lives in the project as gzip-compressed CSV, one file per campaign (``all``, ``men``,
``women``), 10,000 logged recommendations each. Every row is one impression of one item
at one position, shown by a uniform-random policy with a known propensity; a row with
``click == 1`` is an impression the user clicked.

The mapping is pure (rows in, ``(logical topic, record)`` pairs out) so that the demo, the
tests and later backfills produce exactly the same events from the same rows.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import heapq
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from headwater.errors import NotFoundError

__all__ = [
    "CAMPAIGNS",
    "USER_FEATURES",
    "iter_events",
    "iter_rows",
    "merged_events",
    "retimed",
    "row_events",
    "sample_data_dir",
    "user_id",
]

CAMPAIGNS: tuple[str, ...] = ("all", "men", "women")
USER_FEATURES: tuple[str, ...] = tuple(f"user_feature_{i}" for i in range(4))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DEFAULT_DIR = Path(__file__).resolve().parents[1] / "infra" / "sample_data" / "obd" / "random"

Event = tuple[str, dict[str, Any]]


def sample_data_dir(root: Path | None = None) -> Path:
    """The folder holding ``<campaign>/<campaign>.csv.gz``; raises if the project copy is missing."""
    folder = root or _DEFAULT_DIR
    if not (folder / "all" / "all.csv.gz").is_file():
        raise NotFoundError(
            f"no Open Bandit sample data in {folder}: it ships with the repository under "
            "infra/sample_data/obd/random; run from a full clone"
        )
    return folder


def iter_rows(campaign: str = "all", root: Path | None = None) -> Iterator[dict[str, str]]:
    """The raw CSV rows of one campaign, as strings, in file order."""
    if campaign not in CAMPAIGNS:
        raise NotFoundError(f"unknown campaign {campaign!r}; known: {', '.join(CAMPAIGNS)}")
    path = sample_data_dir(root) / campaign / f"{campaign}.csv.gz"
    with gzip.open(path, "rt", newline="") as f:
        yield from csv.DictReader(f)


def user_id(row: Mapping[str, str]) -> str:
    """A stable user key from the four hashed user features.

    The dataset has no user id. The four (already hashed) user features describe a user
    profile, so their hash identifies that profile: users sharing every feature value are
    one entity here, which is the finest grain the data allows.
    """
    joined = "|".join(row[f] for f in USER_FEATURES)
    return hashlib.sha1(joined.encode()).hexdigest()[:16]


def _epoch_ms(timestamp: str) -> int:
    # e.g. "2019-11-24 00:00:34.762830+00:00"; integer arithmetic, no float rounding.
    return (datetime.fromisoformat(timestamp) - _EPOCH) // timedelta(milliseconds=1)


def row_events(campaign: str, row: Mapping[str, str]) -> list[Event]:
    """The events of one logged recommendation: an impression, plus a click and an outcome if clicked."""
    event_id = f"obd-{campaign}-{row['']}"
    event_time = _epoch_ms(row["timestamp"])
    user = user_id(row)
    item = str(int(row["item_id"]))
    impression: dict[str, Any] = {
        "event_id": event_id,
        "event_time": event_time,
        "user_id": user,
        "item_id": item,
        "action": "IMPRESSION",
        "position": int(row["position"]),
        "campaign": campaign,
        "propensity": float(row["propensity_score"]),
        "session_id": None,
        "user_features": {f: row[f] for f in USER_FEATURES},
    }
    events: list[Event] = [("clicks", impression)]
    if int(row["click"]) == 1:
        events.append(("clicks", {**impression, "event_id": f"{event_id}-click", "action": "CLICK"}))
        events.append(
            (
                "outcomes",
                {
                    "event_id": f"{event_id}-outcome",
                    "event_time": event_time,
                    "entity_key": user,
                    "prediction_id": None,
                    "item_id": item,
                    "outcome_type": "click",
                    "value": 1.0,
                },
            )
        )
    return events


def iter_events(campaign: str = "all", root: Path | None = None) -> Iterator[Event]:
    """``(logical topic, record)`` pairs of one campaign in event-time order.

    Rows are sorted by time (the files already are; the sort is stable so a click always
    follows its impression).
    """
    rows = sorted(iter_rows(campaign, root), key=lambda r: _epoch_ms(r["timestamp"]))
    for row in rows:
        yield from row_events(campaign, row)


def merged_events(campaigns: Iterable[str] = CAMPAIGNS, root: Path | None = None) -> Iterator[Event]:
    """Several campaigns interleaved into one stream in event-time order, as the site logged them."""
    streams = [iter_events(c, root) for c in campaigns]
    return heapq.merge(*streams, key=lambda e: int(e[1]["event_time"]))


def retimed(events: Iterable[Event], end_ms: int, run: str) -> list[Event]:
    """The events moved in time so that the last one happens at ``end_ms``, gaps kept.

    Replaying the 2019 sample as today's traffic keeps its values servable (online-store TTL
    is by event time). ``run`` is appended to every event id so that a replay is new traffic,
    not a duplicate of an earlier one.
    """
    items = list(events)
    if not items:
        return []
    shift = end_ms - max(int(r["event_time"]) for _, r in items)
    return [
        (topic, {**r, "event_id": f"{r['event_id']}-{run}", "event_time": int(r["event_time"]) + shift})
        for topic, r in items
    ]
