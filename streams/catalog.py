"""The schema catalog: every version of every event schema, addressed by fingerprint.

Files are ``schemas/avro/<event_type>.v<N>.avsc``; every historical version stays in the
catalog so that a reader can resolve any writer schema ever used. Parsing canonical forms
and CRC-64-AVRO fingerprints come from fastavro itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastavro import parse_schema
from fastavro.schema import fingerprint, to_parsing_canonical_form

from headwater.errors import ConfigError, NotFoundError

__all__ = ["SchemaCatalog", "SchemaVersion"]

_FILE_RE = re.compile(r"^(?P<type>[a-z][a-z0-9_]*)\.v(?P<version>[1-9][0-9]*)\.avsc$")


@dataclass(frozen=True)
class SchemaVersion:
    """One version of one event schema."""

    event_type: str
    version: int
    raw: dict[str, Any] = field(repr=False)
    parsed: Any = field(repr=False)
    canonical: str = field(repr=False)
    fingerprint: bytes  # 8 bytes, little-endian CRC-64-AVRO, as written in single-object encoding
    path: Path | None = None


class SchemaCatalog:
    """All schema versions in a folder, looked up by event type or by fingerprint."""

    def __init__(self, versions: list[SchemaVersion]) -> None:
        self._by_type: dict[str, list[SchemaVersion]] = {}
        self._by_fingerprint: dict[bytes, SchemaVersion] = {}
        for sv in sorted(versions, key=lambda v: (v.event_type, v.version)):
            self._by_type.setdefault(sv.event_type, []).append(sv)
            self._by_fingerprint[sv.fingerprint] = sv

    @classmethod
    def load(cls, directory: Path) -> SchemaCatalog:
        """Load every ``*.avsc`` in ``directory``; a bad file raises :class:`ConfigError` naming it."""
        if not directory.is_dir():
            raise ConfigError(f"schema folder {directory} does not exist: set schemas_dir")
        versions = [cls.version_from_file(path) for path in sorted(directory.glob("*.avsc"))]
        if not versions:
            raise ConfigError(f"no .avsc schemas in {directory}")
        return cls(versions)

    @staticmethod
    def version_from_file(path: Path) -> SchemaVersion:
        match = _FILE_RE.match(path.name)
        if match is None:
            raise ConfigError(f"{path.name}: schema files are named <event_type>.v<N>.avsc")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
        return SchemaCatalog.make_version(match["type"], int(match["version"]), raw, path)

    @staticmethod
    def make_version(
        event_type: str, version: int, raw: dict[str, Any], path: Path | None = None
    ) -> SchemaVersion:
        try:
            parsed = parse_schema(raw, _write_hint=False)
        except Exception as exc:  # fastavro raises several types for invalid schemas
            raise ConfigError(f"{path or event_type}: invalid Avro schema: {exc}") from exc
        canonical = to_parsing_canonical_form(parsed)
        fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
        return SchemaVersion(event_type, version, raw, parsed, canonical, fp, path)

    @property
    def event_types(self) -> list[str]:
        return sorted(self._by_type)

    def versions(self, event_type: str) -> list[SchemaVersion]:
        try:
            return list(self._by_type[event_type])
        except KeyError:
            raise NotFoundError(
                f"unknown event type {event_type!r}; known: {', '.join(self.event_types)}"
            ) from None

    def latest(self, event_type: str) -> SchemaVersion:
        return self.versions(event_type)[-1]

    def get(self, event_type: str, version: int | None = None) -> SchemaVersion:
        if version is None:
            return self.latest(event_type)
        for sv in self.versions(event_type):
            if sv.version == version:
                return sv
        raise NotFoundError(f"{event_type} has no version {version}")

    def by_fingerprint(self, fp: bytes) -> SchemaVersion | None:
        return self._by_fingerprint.get(fp)

    def __iter__(self) -> Iterator[SchemaVersion]:
        for event_type in self.event_types:
            yield from self._by_type[event_type]
