"""The artifact store over fsspec: a local directory by default, any fsspec URL in production.

Blobs live at ``<root>/sha256/ab/abcdef....skops``. The same bytes always land on the same
path, so a put is idempotent and concurrent writers of the same model agree. On a local
disk the bytes go to a temporary file that is renamed into place, so a reader never sees a
half-written artifact; object stores (s3://, gs://, memory://) make a single PUT atomic.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from headwater.errors import ConfigError, NotFoundError
from headwater.files import atomic_write
from registry.artifacts.base import ArtifactStore, content_path, sha256_of

__all__ = ["FsspecArtifactStore"]

log = logging.getLogger(__name__)


def _open_fs(url: str) -> tuple[Any, str]:
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # unknown protocol or its extra not installed
        raise ConfigError(
            f"cannot open artifact store {url!r}: {exc} (install the fsspec extra for its protocol, "
            "e.g. s3fs for s3://)"
        ) from exc
    return fs, str(path).rstrip("/")


class FsspecArtifactStore(ArtifactStore):
    """Content-addressed blobs under one fsspec root URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = _open_fs(url)
        self._local = isinstance(self.fs, LocalFileSystem)

    def _path(self, sha256: str, suffix: str) -> str:
        return f"{self.root}/{content_path(sha256, suffix)}"

    def put(self, data: bytes, *, suffix: str = ".skops") -> tuple[str, str]:
        sha256 = sha256_of(data)
        path = self._path(sha256, suffix)
        uri = str(self.fs.unstrip_protocol(path))
        if self.fs.exists(path):
            # Same address, same content (unless tampered with, which every get detects).
            return uri, sha256
        if self._local:
            atomic_write(Path(path), data)  # readers see nothing or everything
        else:
            self.fs.pipe_file(path, data)
        log.info("stored artifact %s (%d bytes)", uri, len(data))
        return uri, sha256

    def _read(self, uri: str) -> bytes | None:
        fs, path = _open_fs(uri)
        try:
            return bytes(fs.cat_file(path))
        except FileNotFoundError:
            return None

    def get(self, uri: str, sha256: str) -> bytes:
        data = self._read(uri)
        if data is None:
            # The store may have moved (another bucket, a copied directory): the content address
            # under this store's root finds the same bytes, and the sha256 check still applies.
            name = uri.rsplit("/", 1)[-1]
            suffix = name[len(sha256) :] if name.startswith(sha256) else ".skops"
            local = self._path(sha256, suffix)
            if self.fs.exists(local):
                data = bytes(self.fs.cat_file(local))
        if data is None:
            raise NotFoundError(
                f"artifact {uri} (sha256 {sha256}) is not in the artifact store {self.url}: "
                "check settings.registry.artifact_store"
            )
        return self.verify(uri, data, sha256)

    def exists(self, uri: str) -> bool:
        fs, path = _open_fs(uri)
        return bool(fs.exists(path))
