"""Is the lake what the lake wrote? Checks of its files against the manifest, and a watch on queries.

:func:`check_lake` (``headwater doctor``) compares each topic folder with its manifest
(:mod:`processors.lake.manifest`): a recorded file that is gone, shorter or longer than
written, or whose bytes no longer hash to what was written is an error, as is a file whose
Parquet footer cannot be read or counts other rows than were written; a file the manifest does
not know is a warning (``adopt=True`` records the readable ones: a lake from before manifests).

:class:`LakeWatch` is the offline store's guard around a query: the files of the tables it
reads are listed before and after, and a file deleted, truncated or replaced meanwhile, or
recorded by the manifest but absent, gets a WARNING naming it, since the answer may lack its
rows (or hold them twice). A query cannot be made consistent with a lake that changes under
it, but it must never be silently smaller.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from headwater.integrity import CheckReport
from processors.lake.layout import DATE_PREFIX, FileName
from processors.lake.manifest import MANIFESTS_DIR, Recorded, file_sha256, live_files, manifest_path, parse
from processors.lake.manifest import record_added as record_file
from processors.lake.writer import EPOCHS_FILE

__all__ = ["LakeWatch", "check_lake"]

log = logging.getLogger(__name__)

_SHOWN = 5  # file names a warning lists before "and N more"


@dataclass(frozen=True)
class _Stat:
    size: int
    mtime_ns: int
    inode: int


def _scan(topic_dir: Path) -> dict[str, _Stat]:
    """The complete lake files of a topic folder (not temporary ones), by path relative to it."""
    files: dict[str, _Stat] = {}
    try:
        days = [e for e in os.scandir(topic_dir) if e.is_dir() and e.name.startswith(DATE_PREFIX)]
    except FileNotFoundError:
        return files
    for day in days:
        try:
            entries = list(os.scandir(day.path))
        except FileNotFoundError:  # removed while listing
            continue
        for entry in entries:
            if FileName.parse(entry.name) is None:
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            files[f"{day.name}/{entry.name}"] = _Stat(st.st_size, st.st_mtime_ns, st.st_ino)
    return files


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def _footer_rows(path: Path) -> int | str:
    """The row count in the file's Parquet footer, or why it cannot be read."""
    try:
        return int(pq.read_metadata(path).num_rows)
    except Exception as exc:  # a damaged footer fails in many ways (even UnicodeDecodeError)
        return " ".join(str(exc).split())[:200] or type(exc).__name__


def _topics(root: Path) -> list[str]:
    names = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    manifests = root / MANIFESTS_DIR
    if manifests.is_dir():
        names |= {p.stem for p in manifests.glob("*.jsonl")}
    return sorted(names)


def check_lake(root: Path, *, verify_content: bool = True, adopt: bool = False) -> CheckReport:
    """Every topic folder of the lake at ``root`` against its manifest; see the module docstring.

    ``verify_content`` hashes every recorded file (reads the whole lake); without it sizes and
    footers only are checked.
    """
    report = CheckReport(f"lake {root}")
    if not root.is_dir():
        report.warning(str(root), "no lake here (nothing archived yet)")
        return report
    epochs = root / EPOCHS_FILE
    if epochs.exists():
        try:
            json.loads(epochs.read_bytes())["epochs"]  # parsed to be checked
        except (ValueError, KeyError, TypeError) as exc:
            report.error(str(epochs), f"not readable ({exc}): the lake sink cannot start an epoch")
    files = total = 0
    for topic in _topics(root):
        topic_report = _check_topic(root, topic, verify_content)
        if topic_report.errors:
            # A writer may have been superseding or rewriting files while this one looked (the
            # manifest and the folder were read at different instants): what is real stays.
            topic_report = _check_topic(root, topic, verify_content)
        report.findings += topic_report.findings
        unrecorded = topic_report.unrecorded
        if unrecorded and adopt:
            for rel, rows in unrecorded.items():
                record_file(root / topic / rel, rows)
            report.warning(topic, f"{len(unrecorded)} readable files were not in the manifest: recorded now")
        elif unrecorded:
            why = "there is no manifest" if topic_report.no_manifest else "the manifest does not know them"
            report.warning(
                topic,
                f"{len(unrecorded)} files cannot be checked, {why} (written before manifests, or by a "
                f"writer that crashed before recording them): {_names(sorted(unrecorded))}; "
                "`headwater doctor --adopt` records them as they are",
            )
        files += topic_report.files
        total += topic_report.bytes
    report.checked = f"{files:,} files, {_size(total)}"
    if not verify_content:
        report.checked += " (sizes and footers only)"
    return report


@dataclass
class _TopicReport(CheckReport):
    files: int = 0
    bytes: int = 0
    unrecorded: dict[str, int] = field(default_factory=dict)  # readable, not in the manifest: rows
    no_manifest: bool = False


def _check_topic(root: Path, topic: str, verify_content: bool) -> _TopicReport:
    # The folder first, then the manifest: a file is renamed in before it is recorded, and its
    # removal recorded before it is unlinked, so a file both recorded and absent is really gone.
    on_disk = _scan(root / topic)
    recorded = live_files(root, topic)
    report = _TopicReport(topic, files=len(on_disk), bytes=sum(s.size for s in on_disk.values()))
    unrecorded: dict[str, int] = {}
    for rel, stat in sorted(on_disk.items()):
        path = root / topic / rel
        rows = _footer_rows(path)
        entry = recorded.get(rel) if recorded is not None else None
        problem = _compare(path, stat, rows, entry, verify_content)
        if problem is not None:
            report.error(f"{topic}/{rel}", problem)
        elif entry is None:
            unrecorded[rel] = int(rows)
    for rel, entry in sorted((recorded or {}).items()):
        if rel not in on_disk and not (root / topic / rel).exists():
            name = FileName.parse(rel.rsplit("/", 1)[-1])
            offsets = (
                f"partition {name.partition} offsets {name.first}-{name.last}" if name else "its offsets"
            )
            report.error(
                f"{topic}/{rel}",
                f"missing: the lake wrote it ({entry.rows:,} rows, {entry.bytes:,} bytes) and never "
                "removed it; its rows are gone from every query (restore it from a backup or, while "
                f"the broker still holds {offsets}, move the lake sink's state aside so that it "
                "archives them again)",
            )
    report.unrecorded = unrecorded
    report.no_manifest = recorded is None
    return report


def _compare(path: Path, stat: _Stat, rows: int | str, entry: Recorded | None, verify: bool) -> str | None:
    """What is wrong with a file on disk, given what the manifest recorded of it (if anything)."""
    if entry is not None and stat.size != entry.bytes:
        how = "truncated" if stat.size < entry.bytes else "longer than written"
        return f"{how}: {stat.size:,} bytes, the lake wrote {entry.bytes:,}"
    if isinstance(rows, str):
        return f"not readable as Parquet (truncated or overwritten?): {rows}"
    if entry is None:
        return None
    if rows != entry.rows:
        return f"holds {rows:,} rows, the lake wrote {entry.rows:,}"
    if verify and file_sha256(path) != entry.sha256:
        return "changed since written: its bytes no longer hash to the sha256 the lake recorded"
    return None


class LakeWatch:
    """Lake files around a query: WARNINGs for files that changed while it ran, or are missing.

    One per offline store; the manifests are read incrementally (only what was appended since).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._manifests: dict[str, tuple[int, int, dict[str, Recorded]]] = {}  # topic -> inode, offset, live
        self._reported: set[str] = set()  # missing files already warned about

    def _recorded(self, topic: str) -> dict[str, Recorded] | None:
        path = manifest_path(self.root, topic)
        try:
            with path.open("rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                cached = self._manifests.get(topic)
                if cached is None or cached[0] != inode:
                    cached = (inode, 0, {})
                _, offset, live = cached
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return None
        complete = data.rfind(b"\n") + 1  # a record being appended right now waits for the next query
        parse(data[:complete].splitlines(), live, path)
        self._manifests[topic] = (inode, offset + complete, live)
        return live

    @contextmanager
    def reading(self, topics: Iterable[str]) -> Iterator[None]:
        """Around a query reading ``topics``' files."""
        topics = sorted(set(topics))
        if not topics:
            yield
            return
        before = {topic: _scan(self.root / topic) for topic in topics}
        yield
        for topic in topics:
            after = _scan(self.root / topic)
            changed = sorted(rel for rel, stat in before[topic].items() if after.get(rel) != stat)
            # Named once: a file that went during this query is not "missing" again below.
            self._reported.update(f"{topic}/{rel}" for rel in changed if rel not in after)
            if changed:
                log.warning(
                    "%s: %d lake files were deleted, truncated or replaced while a query read them (%s): "
                    "its answer may lack their rows or count them twice; run it again",
                    topic,
                    len(changed),
                    _names(changed),
                )
            recorded = self._recorded(topic)
            missing = sorted(
                rel for rel in (recorded or {}) if rel not in after and f"{topic}/{rel}" not in self._reported
            )
            if missing:
                self._reported.update(f"{topic}/{rel}" for rel in missing)
                log.warning(
                    "%s: %d lake files the lake wrote are missing (%s): answers lack their rows; "
                    "run `headwater doctor`",
                    topic,
                    len(missing),
                    _names(missing),
                )


def _names(rels: list[str]) -> str:
    more = len(rels) - _SHOWN
    return ", ".join(rels[:_SHOWN]) + (f" and {more} more" if more > 0 else "")
