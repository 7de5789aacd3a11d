"""Schema compatibility: a change must be readable both ways.

A new version is accepted only if readers of every older version can read it (forward)
and readers of the new version can read every older version (backward), i.e. FULL_TRANSITIVE
in Confluent's terms. The reader/writer rules come from the Apache ``avro`` package's
checker, the reference implementation's port, rather than our own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from streams.catalog import SchemaCatalog, SchemaVersion

__all__ = ["Incompatibility", "check_catalog", "check_pair"]


@dataclass(frozen=True)
class Incompatibility:
    event_type: str
    reader_version: int
    writer_version: int
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.event_type}: v{self.reader_version} readers cannot read v{self.writer_version} "
            f"records: {self.reason}"
        )


def _to_avro(sv: SchemaVersion) -> avro.schema.Schema:
    return avro.schema.parse(json.dumps(sv.raw))


def check_pair(reader: SchemaVersion, writer: SchemaVersion) -> Incompatibility | None:
    result = ReaderWriterCompatibilityChecker().get_compatibility(  # type: ignore[no-untyped-call]
        _to_avro(reader), _to_avro(writer)
    )
    if result.compatibility is SchemaCompatibilityType.compatible:
        return None
    reasons = "; ".join(sorted(str(m) for m in result.messages)) or "incompatible"
    locations = ", ".join(sorted(result.locations))
    return Incompatibility(
        reader.event_type,
        reader.version,
        writer.version,
        f"{reasons} (at {locations})" if locations else reasons,
    )


def check_catalog(catalog: SchemaCatalog) -> list[Incompatibility]:
    """Every pair of versions of every event type, both directions."""
    problems: list[Incompatibility] = []
    for event_type in catalog.event_types:
        versions = catalog.versions(event_type)
        for i, older in enumerate(versions):
            for newer in versions[i + 1 :]:
                for reader, writer in ((newer, older), (older, newer)):
                    problem = check_pair(reader, writer)
                    if problem:
                        problems.append(problem)
    return problems
