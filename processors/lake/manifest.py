"""The lake's manifest: what each topic's folder should hold, so a lost file is noticed.

A file deleted or truncated under the lake would otherwise read as data that never was: a
query over ``<topic>/*/*.parquet`` just sees fewer rows. So every lake file written is
recorded, with its rows, size and sha256, and every file the lake itself removes (superseded
by a rewrite) is recorded as removed, in an append-only JSON-lines file per topic::

    <lake_dir>/_manifests/<topic>.jsonl
    {"add": "date=2019-11-24/clicks+0+0-99.parquet", "rows": 100, "bytes": 5120, "sha256": "...", "ms": ...}
    {"remove": "date=2019-11-24/clicks+0+0-99.parquet", "ms": ...}

Replaying it gives the files the topic should hold (:func:`live_files`); ``headwater doctor``
compares them with the folder, and the offline store warns when a query's files changed or
are missing (:mod:`processors.lake.integrity`). The manifest lives beside the topic folders,
not in them, so a deleted topic folder is noticed too.

Order makes it crash-safe: a file is renamed into place, then recorded; a removal is recorded,
then done. A crash in between leaves a file the manifest does not know (reported as a warning,
recorded again when the sink rewrites it), never a recorded file that is absent. Each record is
one ``write`` to a file opened for appending, so concurrent writers of one topic (the sink's
partitions in several processes, a backfill) never interleave records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headwater.files import fsync_dir

__all__ = ["MANIFESTS_DIR", "Recorded", "live_files", "manifest_path", "record_added", "remove_lake_file"]

log = logging.getLogger(__name__)

MANIFESTS_DIR = "_manifests"


@dataclass(frozen=True)
class Recorded:
    """A file the manifest says its topic holds."""

    relpath: str  # relative to the topic folder: date=YYYY-MM-DD/<name>.parquet
    rows: int
    bytes: int
    sha256: str
    written_ms: int


def manifest_path(lake_root: Path, topic: str) -> Path:
    return lake_root / MANIFESTS_DIR / f"{topic}.jsonl"


def _where(path: Path) -> tuple[Path, str, str]:
    """(lake root, topic, path relative to the topic folder) of ``<root>/<topic>/<date>/<file>``."""
    return path.parents[2], path.parents[1].name, f"{path.parent.name}/{path.name}"


def _append(lake_root: Path, topic: str, records: list[dict[str, Any]]) -> None:
    path = manifest_path(lake_root, topic)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)  # one write: appends from several processes do not interleave
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def record_added(path: Path, rows: int) -> None:
    """Record a lake file just renamed into place (its size and sha256 as they are now)."""
    root, topic, rel = _where(path)
    entry = {
        "add": rel,
        "rows": rows,
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "ms": int(time.time() * 1000),
    }
    _append(root, topic, [entry])


def remove_lake_file(path: Path) -> None:
    """Remove a lake file the lake no longer needs (superseded or replaced): recorded first, so a
    crash never leaves the manifest expecting a file that is gone."""
    root, topic, rel = _where(path)
    _append(root, topic, [{"remove": rel, "ms": int(time.time() * 1000)}])
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def parse(lines: Iterable[bytes], live: dict[str, Recorded], source: Path) -> None:
    """Apply manifest lines to ``live`` (relpath -> what was recorded last)."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "add" in record:
                live[record["add"]] = Recorded(
                    record["add"],
                    int(record["rows"]),
                    int(record["bytes"]),
                    record["sha256"],
                    int(record["ms"]),
                )
            else:
                live.pop(record["remove"], None)
        except (ValueError, KeyError, TypeError) as exc:
            # A torn last line (a crash mid-append) or a damaged manifest: say so, keep the rest.
            log.warning("%s:%d: not a manifest record (%s); skipped", source, n, exc)


def live_files(lake_root: Path, topic: str) -> dict[str, Recorded] | None:
    """The files the topic should hold, by path relative to its folder; None without a manifest."""
    path = manifest_path(lake_root, topic)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    live: dict[str, Recorded] = {}
    parse(data.splitlines(), live, path)
    return live
