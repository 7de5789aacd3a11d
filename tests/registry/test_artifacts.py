"""The artifact store contract, run against every backend: a local directory and fsspec memory://."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from headwater.errors import NotFoundError
from headwater.settings import load_settings
from registry.artifacts import (
    ArtifactIntegrityError,
    ArtifactStore,
    FsspecArtifactStore,
    open_artifact_store,
    sha256_of,
)


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArtifactStore]:
    if request.param == "local":
        yield open_artifact_store(load_settings(data_dir=tmp_path))
        return
    root = f"memory://artifacts-{uuid.uuid4().hex[:8]}"
    yield FsspecArtifactStore(root)
    fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def test_put_is_content_addressed_and_idempotent(store: ArtifactStore) -> None:
    data = b"model bytes \x00\x01"
    uri, sha = store.put(data)
    assert sha == sha256_of(data)
    assert uri.endswith(f"sha256/{sha[:2]}/{sha}.skops")
    assert store.put(data) == (uri, sha)
    assert store.exists(uri)
    assert store.get(uri, sha) == data
    other_uri, other_sha = store.put(b"holdout", suffix=".parquet")
    assert other_uri.endswith(".parquet") and store.get(other_uri, other_sha) == b"holdout"


def test_get_refuses_a_hash_mismatch(store: ArtifactStore) -> None:
    uri, _ = store.put(b"the real model")
    with pytest.raises(ArtifactIntegrityError, match="refusing to load"):
        store.get(uri, sha256_of(b"another model"))


def test_get_of_a_missing_artifact_names_the_store(store: ArtifactStore) -> None:
    sha = sha256_of(b"never stored")
    uri = store.put(b"x")[0].rsplit("/sha256/", 1)[0] + f"/sha256/{sha[:2]}/{sha}.skops"
    assert not store.exists(uri)
    with pytest.raises(NotFoundError, match="is not in the artifact store"):
        store.get(uri, sha)


def test_tampered_file_on_disk_is_refused(tmp_path: Path) -> None:
    store = open_artifact_store(load_settings(data_dir=tmp_path))
    uri, sha = store.put(b"original")
    path = Path(uri.removeprefix("file://"))
    assert path.is_relative_to(tmp_path / "artifacts") and not list(path.parent.glob("*.tmp-*"))
    path.write_bytes(b"tampered")
    with pytest.raises(ArtifactIntegrityError, match=sha):
        store.get(uri, sha)


def test_a_moved_store_still_finds_the_content(tmp_path: Path) -> None:
    old = open_artifact_store(load_settings(data_dir=tmp_path / "old"))
    uri, sha = old.put(b"portable")
    (tmp_path / "old").rename(tmp_path / "new")
    new = open_artifact_store(load_settings(data_dir=tmp_path / "new"))
    assert new.get(uri, sha) == b"portable"
