"""Reading a whole LMDB environment to find corrupted pages (the online store and processor state).

LMDB keeps no checksums: a page overwritten by garbage is found only by reading it. So every
key and value is read, in one read transaction (a consistent snapshot, beside a live writer),
which visits every branch, leaf and overflow page in use; LMDB itself refuses many damaged pages
(``MDB_CORRUPTED``, ``MDB_PAGE_NOTFOUND``), keys must come in strictly increasing order, and
``check_item`` decodes each record as its store wrote it. A page of garbage can also make LMDB
read outside the map and crash, so the reading runs in a child process: a crash is reported, not
suffered, and a reader that never ends (a cycle of corrupted page numbers) is stopped after
``timeout_s``. Free pages are not read: garbage there loses nothing.
"""

from __future__ import annotations

import importlib
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb

from serving.online_store.base import OnlineStoreError, check_feature_set
from serving.online_store.codec import check_record, check_schema
from serving.online_store.lmdb import MAX_READERS, SCHEMA_PREFIX, schema_key

__all__ = ["ItemCheck", "check_online_item", "verify_lmdb"]


#: (key, value, get) -> why the pair cannot be what the store wrote, or None; ``get`` reads
#: another key in the same snapshot. A module-level function: it is sent to the child by name.
ItemCheck = Callable[[bytes, bytes, Callable[[bytes], Any]], str | None]

_MAX_PROBLEMS = 20  # a corrupted page spoils many records; the first ones say enough


def verify_lmdb(
    path: Path, check_item: ItemCheck, *, timeout_s: float = 600.0
) -> tuple[int, list[tuple[str, str]]]:
    """Read every record of the LMDB environment at ``path``: (records read, [(where, problem)])."""
    data = path / "data.mdb"
    if not data.is_file():
        return 0, [(str(data), "missing: the environment has no data file")]
    # A child of its own (``python -m``, not multiprocessing: nothing of the caller's __main__ is
    # re-run there), which opens the environment afresh and answers in JSON on stdout.
    target = f"{check_item.__module__}:{check_item.__qualname__}"
    argv = [sys.executable, "-m", "serving.online_store.lmdb_verify", str(path), target]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:  # run() has killed it
        return 0, [(str(data), f"reading it did not end within {timeout_s:.0f}s: pages point in a cycle?")]
    if done.returncode < 0:
        how = signal.Signals(-done.returncode).name
        return 0, [(str(data), f"reading it crashed the reader ({how}): its pages are corrupted")]
    try:
        records, problems = json.loads(done.stdout)
    except ValueError:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        return 0, [(str(data), f"the reader failed (exit code {done.returncode}): {last}")]
    return int(records), [(str(where), str(problem)) for where, problem in problems]


def _read_all(path: str, check_item: ItemCheck) -> tuple[int, list[tuple[str, str]]]:
    """In the child: every record in key order, checked; the count and the problems."""
    problems: list[tuple[str, str]] = []
    records = 0
    previous: bytes | None = None
    try:
        env = lmdb.open(path, readonly=True, lock=True, max_readers=MAX_READERS, max_dbs=0, subdir=True)
    except lmdb.Error as exc:
        return 0, [(path, f"LMDB cannot open it: {exc}")]
    try:
        info, psize = env.info(), env.stat()["psize"]
        needed = (info["last_pgno"] + 1) * psize
        size = (Path(path) / "data.mdb").stat().st_size
        if size < needed:  # reading on would fault past the end of the file
            return 0, [(f"{path}/data.mdb", f"truncated: {size:,} bytes, its pages need {needed:,}")]
        with env.begin(buffers=True) as txn:
            get = txn.get
            for raw_key, raw_value in txn.cursor():
                key, value = bytes(raw_key), bytes(raw_value)
                records += 1
                if previous is not None and key <= previous:
                    problems.append((_show(key), f"out of order after {_show(previous)}: a damaged page"))
                previous = key
                problem = check_item(key, value, get)
                if problem is not None:
                    problems.append((_show(key), problem))
                if len(problems) >= _MAX_PROBLEMS:
                    problems.append((path, "more problems not listed"))
                    break
    except lmdb.Error as exc:
        after = f" after {records:,} records (last key {_show(previous)})" if previous is not None else ""
        problems.append((f"{path}/data.mdb", f"LMDB: {exc}{after}: a corrupted page"))
    finally:
        env.close()
    return records, problems


def _show(key: bytes | None) -> str:
    text = repr(key)[2:-1] if key is not None else "-"
    return text if len(text) <= 80 else text[:77] + "..."


def check_online_item(key: bytes, value: bytes, get: Callable[[bytes], Any]) -> str | None:
    """A record of the online store: a schema by its id, or a feature set's entity record."""
    if key.startswith(SCHEMA_PREFIX):
        raw_id = key[len(SCHEMA_PREFIX) :]
        if len(raw_id) != 8:
            return "a schema key without an 8-byte id"
        return check_schema(int.from_bytes(raw_id, "big", signed=True), value)
    feature_set, sep, entity = key.partition(b"\0")
    try:
        check_feature_set(feature_set.decode())
        entity.decode()
    except (UnicodeDecodeError, OnlineStoreError) as exc:
        return f"not a <feature set> NUL <entity> key: {exc}"
    if not sep or not entity:
        return "not a <feature set> NUL <entity> key"

    return check_record(value, lambda schema_id: get(schema_key(schema_id)))


def _main() -> None:
    """``python -m serving.online_store.lmdb_verify PATH module:function``: the child's side."""
    path, target = sys.argv[1], sys.argv[2]
    module, name = target.split(":")
    check_item = getattr(importlib.import_module(module), name)
    json.dump(_read_all(path, check_item), sys.stdout)


if __name__ == "__main__":
    _main()
