"""Content-addressed artifact storage for model versions (skops files) and their holdouts.

``open_artifact_store(settings)`` opens ``settings.artifact_store_url``: a local directory by
default, any fsspec URL (``s3://bucket/models``, ``memory://...``) in production.
"""

from __future__ import annotations

from headwater.settings import Settings
from registry.artifacts.base import ArtifactIntegrityError, ArtifactStore, content_path, sha256_of
from registry.artifacts.fsspec import FsspecArtifactStore

__all__ = [
    "ArtifactIntegrityError",
    "ArtifactStore",
    "FsspecArtifactStore",
    "content_path",
    "open_artifact_store",
    "sha256_of",
]


def open_artifact_store(settings: Settings) -> ArtifactStore:
    """The configured artifact store (one fsspec backend covers local directories and URLs)."""
    return FsspecArtifactStore(settings.artifact_store_url)
