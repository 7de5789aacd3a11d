"""The lake knows what it holds: its manifest, the check against it, and the offline store's warning
when a query's files change under it or are missing (real lake files, real chdb)."""

from __future__ import annotations

import http.server
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batch.offline_store import OfflineStore, open_offline_store
from headwater.settings import Settings
from processors.lake import LakeWriter, check_lake
from processors.lake.manifest import live_files

T0 = 1_574_553_634_762


def click(offset: int) -> dict[str, Any]:
    return {
        "event_id": f"e{offset}", "event_time": T0 + offset * 1000, "user_id": f"u{offset % 5}",
        "item_id": "14", "action": "CLICK", "position": 3, "campaign": "all",
    }  # fmt: skip


def archive(writer: LakeWriter, batches: int = 4, per_batch: int = 10) -> list[Path]:
    """Batches of clicks over two partitions: every batch writes one file per partition."""
    for b in range(batches):
        offsets = range(b * per_batch, (b + 1) * per_batch)
        writer.write("clicks", [(o % 2, o, click(o)) for o in offsets])
    return sorted((writer.root / "clicks").glob("*/*.parquet"))


def test_the_manifest_follows_writes_rewrites_and_superseded_files(writer: LakeWriter) -> None:
    files = archive(writer)
    live = live_files(writer.root, "clicks")
    assert live is not None and sorted(live) == sorted(f"{p.parent.name}/{p.name}" for p in files)
    for rel, entry in live.items():
        path = writer.root / "clicks" / rel
        assert entry.bytes == path.stat().st_size and entry.rows == pq.read_metadata(path).num_rows
    # A restarted sink cuts another batch over the same offsets: superseded files are removed and
    # the manifest says so; the rows outside the new range are kept in files it records.
    writer.write("clicks", [(o % 2, o, click(o)) for o in range(5, 25)])
    after = live_files(writer.root, "clicks")
    on_disk = sorted(f"{p.parent.name}/{p.name}" for p in (writer.root / "clicks").glob("*/*.parquet"))
    assert after is not None and sorted(after) == on_disk and sorted(after) != sorted(live)
    report = check_lake(writer.root)
    assert report.findings == [] and report.checked.startswith(f"{len(on_disk)} files")


def test_check_finds_deleted_truncated_changed_and_unknown_files(writer: LakeWriter) -> None:
    deleted, truncated, changed, kept = archive(writer)[:4]
    rows = pq.read_metadata(deleted).num_rows
    deleted.unlink()
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    flipped = bytearray(changed.read_bytes())
    footer = int.from_bytes(flipped[-8:-4], "little")  # PAR1, pages, footer, its length, PAR1
    flipped[(4 + len(flipped) - 8 - footer) // 2] ^= 0xFF  # in a page: same size, same footer
    changed.write_bytes(bytes(flipped))
    stray = kept.parent / "clicks+9+0-4.parquet"
    stray.write_bytes(kept.read_bytes())  # a file the lake never wrote

    report = check_lake(writer.root)

    by_file = {f.where.split("/", 1)[1]: f for f in report.findings if "/" in f.where}
    rel = lambda p: f"{p.parent.name}/{p.name}"  # noqa: E731
    assert by_file[rel(deleted)].message.startswith(f"missing: the lake wrote it ({rows} rows")
    assert (
        by_file[rel(truncated)].message
        == f"truncated: {len(data) // 2:,} bytes, the lake wrote {len(data):,}"
    )
    assert by_file[rel(changed)].message.startswith("changed since written")
    assert [f.severity for f in report.findings].count("error") == 3 and not report.ok
    [unknown] = report.warnings
    assert unknown.where == "clicks" and rel(stray) in unknown.message
    # Without hashing, the flipped bytes go unseen (same size, readable footer): that is what --quick trades.
    quick = check_lake(writer.root, verify_content=False)
    assert len(quick.errors) == 2
    # --adopt records the readable stray; it is then checked like the others.
    check_lake(writer.root, adopt=True)
    assert rel(stray) in (live_files(writer.root, "clicks") or {})
    assert not check_lake(writer.root).warnings


def test_a_lake_from_before_manifests_is_reported_then_adopted(writer: LakeWriter) -> None:
    archive(writer, batches=2)
    (writer.root / "_manifests" / "clicks.jsonl").unlink()
    report = check_lake(writer.root)
    assert report.ok and "there is no manifest" in report.warnings[0].message
    assert check_lake(writer.root, adopt=True).ok
    assert check_lake(writer.root).findings == []


@pytest.fixture()
def hook() -> Iterator[tuple[str, list[Any]]]:
    """A URL on loopback that runs the actions queued in the list when a query fetches it: a way
    to change the lake in the middle of a query, between ClickHouse listing its files and
    reading them."""
    actions: list[Any] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            while actions:
                actions.pop(0)()
            self.send_response(200)
            self.send_header("Content-Type", "text/csv")
            self.end_headers()
            self.wfile.write(b"1\n")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", actions
    server.shutdown()
    server.server_close()


def test_a_query_whose_files_change_under_it_warns(
    writer: LakeWriter,
    store: OfflineStore,
    lake_settings: Settings,
    hook: tuple[str, list[Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    files = archive(writer)
    url, actions = hook
    during = f"SELECT count() AS n FROM clicks WHERE (SELECT max(a) FROM url('{url}', CSV, 'a UInt8')) = 1"
    assert store.query("SELECT count() AS n FROM clicks").column("n").to_pylist() == [40]
    assert store.query(during).column("n").to_pylist() == [40]  # nothing changed: no warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    # Deleted while the query runs: its answer is smaller, and it says so.
    lost = pq.read_metadata(files[0]).num_rows
    actions.append(files[0].unlink)
    with caplog.at_level(logging.WARNING, logger="processors.lake.integrity"):
        n = store.query(during).column("n").to_pylist()
    changed = [r.getMessage() for r in caplog.records if "while a query read them" in r.getMessage()]
    assert len(changed) == 1 and files[0].name in changed[0]
    assert n in ([40], [40 - lost])  # whichever ClickHouse had listed when the file went
    # Named once by this store; another (another process, a later command) names it as missing,
    # once, at its first query over the table.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="processors.lake.integrity"):
        store.query("SELECT count() FROM clicks")
        with open_offline_store(lake_settings) as later:
            later.query("SELECT count() FROM clicks")
            later.query("SELECT count() FROM clicks")
    missing = [r.getMessage() for r in caplog.records if "are missing" in r.getMessage()]
    assert len(missing) == 1 and files[0].name in missing[0] and "headwater doctor" in missing[0]

    # Replaced by other content of another size while the query runs (a rewrite of the same name).
    caplog.clear()

    def replace() -> None:  # as an atomic rewrite does: another file renamed over the name
        copy = files[1].with_name(".replacement.tmp")
        copy.write_bytes(files[2].read_bytes())
        os.replace(copy, files[1])

    actions.append(replace)
    with caplog.at_level(logging.WARNING, logger="processors.lake.integrity"):
        store.query(during)
    changed = [r.getMessage() for r in caplog.records if "while a query read them" in r.getMessage()]
    assert len(changed) == 1 and files[1].name in changed[0]
    # A query over another table does not look at clicks' files.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="processors.lake.integrity"):
        store.query("SELECT count() FROM outcomes")
    assert not caplog.records
