"""The registry's state: a pure fold of the ``models`` topic's ModelEvent records.

Every reader (the Registry itself, each serving replica, the Dagster assets) builds the same
view by applying the events in topic order. Nothing here does I/O.

What compaction keeps decides what the fold must be able to rebuild from (keys in
:func:`streams.topics._model_key`): the last event per ``name:version`` (registration, or
the archive event, which therefore repeats the version's full description), the last move
per ``name@alias`` (which records ``previous_version``, so one rollback step survives
compaction) and the last attach/detach per shadow. Before compaction, every alias move is
seen, and the fold keeps the whole history.

Rollback is an alias move whose metadata has ``"rollback": true``. The fold keeps, per alias,
the stack of versions it was moved to: a promotion pushes, a rollback pops, so rolling back
twice after three promotions lands on the first version.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from headwater.errors import ConfigError, NotFoundError

__all__ = ["DEFAULT_ALIAS", "AliasMove", "ModelVersion", "RegistryState", "parse_metadata", "parse_ref"]

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"
_REF = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)(?:@(?P<alias>[A-Za-z0-9_.-]+)|:(?P<version>\S+))?$")


def parse_metadata(raw: Mapping[str, str]) -> dict[str, Any]:
    """The event's metadata map: every value is a JSON string (a bare string is kept as is)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value  # written by hand or an older writer: keep the text
    return out


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """Split a model reference: ``name`` -> (name, "production", None), ``name@alias`` ->
    (name, alias, None), ``name:3`` -> (name, None, 3)."""
    m = _REF.match(ref.strip())
    if m is None:
        raise ConfigError(f"bad model reference {ref!r}: write name, name@alias or name:version")
    version = m["version"]
    if version is not None:
        if not version.isdigit() or int(version) < 1:
            raise ConfigError(f"bad model reference {ref!r}: the version after ':' is a number >= 1")
        return m["name"], None, int(version)
    return m["name"], m["alias"] or DEFAULT_ALIAS, None


@dataclass
class ModelVersion:
    """One registered version of a model."""

    name: str
    version: int
    artifact_uri: str
    artifact_sha256: str
    feature_refs: list[str]
    metrics: dict[str, float]
    metadata: dict[str, Any]
    registered_at: int
    archived: bool = False
    actor: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class AliasMove:
    """One move of an alias, as recorded in its ALIAS_MOVED event."""

    version: int
    previous_version: int | None
    event_time: int
    actor: str
    reason: str | None
    forced: bool
    rollback: bool
    metadata: dict[str, Any] = field(default_factory=dict)


class RegistryState:
    """Models, versions, aliases, shadows and alias history, from ModelEvent records in order."""

    def __init__(self, records: Iterable[Mapping[str, Any]] = ()) -> None:
        self._versions: dict[str, dict[int, ModelVersion]] = {}
        self._history: dict[tuple[str, str], list[AliasMove]] = {}
        self._stack: dict[tuple[str, str], list[int]] = {}
        self._shadows: dict[tuple[str, str], list[int]] = {}
        self._seen: set[str] = set()
        self.events = 0
        for record in records:
            self.apply(record)

    # -- the fold -------------------------------------------------------------------------
    def apply(self, record: Mapping[str, Any]) -> None:
        """Apply one ModelEvent record; a replayed event (same event_id) changes nothing."""
        event_id = record["event_id"]
        if event_id in self._seen:
            return
        self._seen.add(event_id)
        self.events += 1
        kind = str(record["kind"])
        name, version = record["model_name"], int(record["version"])
        if kind == "VERSION_REGISTERED":
            # Last wins, as compaction keeps the last record per name:version.
            self._versions.setdefault(name, {})[version] = self._version_of(record)
        elif kind == "VERSION_ARCHIVED":
            known = self._versions.setdefault(name, {}).get(version)
            if known is None:  # compaction dropped the registration: the archive event describes it
                known = self._versions[name][version] = self._version_of(record)
            known.archived = True
        elif kind == "ALIAS_MOVED":
            self._move(name, str(record["alias"]), version, record)
        elif kind == "SHADOW_ATTACHED":
            shadows = self._shadows.setdefault((name, str(record["alias"])), [])
            if version not in shadows:
                shadows.append(version)
        elif kind == "SHADOW_DETACHED":
            shadows = self._shadows.get((name, str(record["alias"])), [])
            if version in shadows:
                shadows.remove(version)
        else:
            log.warning("model event %s has unknown kind %s; ignored", event_id, kind)

    @staticmethod
    def _version_of(record: Mapping[str, Any]) -> ModelVersion:
        metadata = parse_metadata(record.get("metadata") or {})
        registered_at = metadata.pop("registered_at", None) if record["kind"] == "VERSION_ARCHIVED" else None
        return ModelVersion(
            name=record["model_name"],
            version=int(record["version"]),
            artifact_uri=record.get("artifact_uri") or "",
            artifact_sha256=record.get("artifact_sha256") or "",
            feature_refs=list(record.get("feature_refs") or []),
            metrics={k: float(v) for k, v in (record.get("metrics") or {}).items()},
            metadata=metadata,
            registered_at=int(registered_at if registered_at is not None else record["event_time"]),
            actor=record.get("actor") or "",
        )

    def _move(self, name: str, alias: str, version: int, record: Mapping[str, Any]) -> None:
        metadata = parse_metadata(record.get("metadata") or {})
        move = AliasMove(
            version=version,
            previous_version=record.get("previous_version"),
            event_time=int(record["event_time"]),
            actor=record.get("actor") or "",
            reason=record.get("reason"),
            forced=bool(record.get("forced")),
            rollback=bool(metadata.get("rollback")),
            metadata=metadata,
        )
        self._history.setdefault((name, alias), []).append(move)
        stack = self._stack.setdefault((name, alias), [])
        if not stack and move.previous_version is not None:
            stack.append(move.previous_version)  # history before this event was compacted away
        if move.rollback:
            while stack and stack[-1] != version:
                stack.pop()
            if not stack:
                stack.append(version)
        else:
            stack.append(version)

    # -- queries ---------------------------------------------------------------------------
    def seen(self, event_id: str) -> bool:
        return event_id in self._seen

    def models(self) -> list[str]:
        return sorted(set(self._versions) | {name for name, _ in self._history})

    def _model(self, name: str) -> dict[int, ModelVersion]:
        versions = self._versions.get(name)
        if versions is None:
            known = ", ".join(self.models()) or "none registered yet"
            raise NotFoundError(f"unknown model {name!r}; known models: {known}")
        return versions

    def versions(self, name: str) -> list[ModelVersion]:
        return [v for _, v in sorted(self._model(name).items())]

    def version(self, name: str, version: int) -> ModelVersion:
        versions = self._model(name)
        mv = versions.get(version)
        if mv is None:
            known = ", ".join(str(v) for v in sorted(versions)) or "none"
            raise NotFoundError(f"model {name!r} has no version {version}; versions: {known}")
        return mv

    def next_version(self, name: str) -> int:
        return max(self._versions.get(name, {}), default=0) + 1

    def find_artifact(self, name: str, sha256: str) -> ModelVersion | None:
        """The version of ``name`` whose artifact has this sha256, if one is registered."""
        for mv in self._versions.get(name, {}).values():
            if mv.artifact_sha256 == sha256:
                return mv
        return None

    def alias(self, name: str, alias: str) -> int | None:
        history = self._history.get((name, alias))
        return history[-1].version if history else None

    def aliases(self, name: str) -> dict[str, int]:
        """Every alias of the model and the version it points at."""
        return {a: h[-1].version for (n, a), h in sorted(self._history.items()) if n == name and h}

    def aliases_of(self, name: str, version: int) -> list[str]:
        return [a for a, v in self.aliases(name).items() if v == version]

    def alias_history(self, name: str, alias: str) -> list[AliasMove]:
        return list(self._history.get((name, alias), []))

    def last_promotion_ms(self, name: str, alias: str) -> int | None:
        """Event time of the alias's last move (promotion or rollback); None if never moved."""
        history = self._history.get((name, alias))
        return history[-1].event_time if history else None

    def rollback_target(self, name: str, alias: str) -> int | None:
        """The version a rollback of the alias returns to: the one below the current in its stack,
        skipping archived versions; None when there is none."""
        earlier = self.earlier_versions(name, alias)
        return earlier[0] if earlier else None

    def earlier_versions(self, name: str, alias: str) -> list[int]:
        """The versions the alias would return to, newest first: those below the current one in
        its stack (promotions push, rollbacks pop, so a version rolled back from is not among
        them), each once, archived ones skipped. What serving falls back to when the current
        version cannot be loaded."""
        stack = self._stack.get((name, alias), [])
        versions = self._versions.get(name, {})
        out: list[int] = []
        for version in reversed(stack[:-1]):
            mv = versions.get(version)
            if mv is not None and not mv.archived and version != stack[-1] and version not in out:
                out.append(version)
        return out

    def shadows(self, name: str, alias: str) -> list[int]:
        return list(self._shadows.get((name, alias), []))

    def all_shadows(self, name: str) -> dict[str, list[int]]:
        return {a: list(v) for (n, a), v in sorted(self._shadows.items()) if n == name and v}

    def resolve(self, ref: str) -> ModelVersion:
        """``name`` (= name@production), ``name@alias`` or ``name:version``; NotFoundError names
        what exists."""
        name, alias, version = parse_ref(ref)
        if version is not None:
            return self.version(name, version)
        assert alias is not None
        self._model(name)
        pointed = self.alias(name, alias)
        if pointed is None:
            known = ", ".join(f"{a} -> {v}" for a, v in self.aliases(name).items()) or "none yet"
            raise NotFoundError(
                f"model {name!r} has no alias {alias!r}; aliases: {known} "
                f"(versions: {', '.join(str(v.version) for v in self.versions(name))})"
            )
        return self.version(name, pointed)

    def all_versions(self) -> list[ModelVersion]:
        return [mv for name in sorted(self._versions) for _, mv in sorted(self._versions[name].items())]
