"""The artifact store interface: immutable blobs addressed by their sha256.

A model version's artifact (skops bytes) and its holdout (Parquet bytes) are written once
and never change; the registry event records ``(uri, sha256)`` and every reader verifies
the sha256 before handing the bytes on, so a tampered or truncated file is refused instead
of loaded.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod

from headwater.errors import HeadwaterError

__all__ = ["ArtifactIntegrityError", "ArtifactStore", "content_path", "sha256_of"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactIntegrityError(HeadwaterError):
    """An artifact's bytes do not hash to the sha256 the registry recorded: it was changed."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_path(sha256: str, suffix: str = ".skops") -> str:
    """The relative, content-addressed path of a blob: ``sha256/ab/abcdef....skops``."""
    if not _SHA256.match(sha256):
        raise ArtifactIntegrityError(f"not a sha256 hex digest: {sha256!r}")
    if suffix and not re.fullmatch(r"\.[A-Za-z0-9]{1,16}", suffix):
        raise HeadwaterError(f"bad artifact suffix {suffix!r}: use a dot and letters, e.g. '.skops'")
    return f"sha256/{sha256[:2]}/{sha256}{suffix}"


class ArtifactStore(ABC):
    """Content-addressed, write-once blob storage; one implementation per storage backend."""

    @abstractmethod
    def put(self, data: bytes, *, suffix: str = ".skops") -> tuple[str, str]:
        """Store ``data`` (idempotent: the same bytes give the same uri); return ``(uri, sha256)``."""

    @abstractmethod
    def get(self, uri: str, sha256: str) -> bytes:
        """The bytes at ``uri``, verified: ArtifactIntegrityError if they do not hash to ``sha256``,
        NotFoundError if there is nothing there."""

    @abstractmethod
    def exists(self, uri: str) -> bool:
        """Whether something is stored at ``uri``."""

    @staticmethod
    def verify(uri: str, data: bytes, sha256: str) -> bytes:
        actual = sha256_of(data)
        if actual != sha256.lower():
            raise ArtifactIntegrityError(
                f"artifact {uri} is corrupt or was tampered with: its sha256 is {actual}, the registry "
                f"recorded {sha256}; refusing to load it (re-register the model from its training run)"
            )
        return data
