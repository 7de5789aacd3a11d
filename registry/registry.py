"""The model registry: every change is an event on the compacted ``models`` topic.

:class:`Registry` writes ModelEvent records with the event producer (keys from the topic
catalog) and reads the topic back with :class:`streams.state.CompactedState` into a
:class:`~registry.state.RegistryState`. Each write waits until its own event has come back
through the topic (read-your-writes), so the state a caller sees next is the state every
other reader (serving replicas, Dagster) converges to. Artifacts go to the content-addressed
artifact store before the event that names them, and are verified on every load.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from headwater.errors import ConfigError, HeadwaterError, NotFoundError
from headwater.settings import Settings
from registry.artifacts import ArtifactStore, open_artifact_store, sha256_of
from registry.gate import (
    Evaluator,
    PromotionPolicyLike,
    PromotionRefused,
    check_promotion,
    promotion_policies,
)
from registry.lineage import prediction_clients
from registry.state import DEFAULT_ALIAS, ModelVersion, RegistryState
from streams.consumer import Event
from streams.producer import EventProducer
from streams.serde import Serde
from streams.state import CompactedState

__all__ = ["TOPIC", "Registry"]

log = logging.getLogger(__name__)

TOPIC = "models"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]*$")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _metadata_json(metadata: Mapping[str, Any]) -> dict[str, str]:
    # The schema's metadata is map<string>: every value travels as JSON, parsed back by the fold.
    return {str(k): json.dumps(v, sort_keys=True, default=str) for k, v in metadata.items()}


class Registry:
    """Register, promote, roll back, archive and shadow model versions; answer lineage questions."""

    def __init__(
        self,
        settings: Settings,
        serde: Serde | None = None,
        *,
        actor: str = "cli",
        artifacts: ArtifactStore | None = None,
    ) -> None:
        if serde is None:
            from streams.catalog import SchemaCatalog

            serde = Serde(SchemaCatalog.load(settings.schemas_dir))
        self.settings = settings
        self.serde = serde
        self.actor = actor
        self.artifacts = artifacts or open_artifact_store(settings)
        self.state = RegistryState()
        self._cond = threading.Condition(threading.RLock())
        self._reader: CompactedState | None = None
        self._producer: EventProducer | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Registry:
        """Read the models topic to its end (idempotent); every other method calls it first."""
        if self._reader is None:
            self._reader = CompactedState(self.settings, self.serde, TOPIC, on_change=self._on_event).start()
        self._reader.wait_until_caught_up(self.settings.registry.catch_up_timeout_s)
        return self

    def _on_event(self, key: str, record: dict[str, Any] | None, event: Event) -> None:
        if record is None:
            return  # a tombstone: nothing in the registry deletes, so nothing to undo
        with self._cond:
            self.state.apply(record)
            self._cond.notify_all()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextmanager
    def view(self) -> Iterator[RegistryState]:
        """The caught-up state, locked against the reader thread while the caller looks at it."""
        self.start()
        with self._cond:
            yield self.state

    # -- writing -------------------------------------------------------------------------------
    def _event(
        self,
        name: str,
        kind: str,
        version: int,
        *,
        mv: ModelVersion | None = None,
        alias: str | None = None,
        previous_version: int | None = None,
        metadata: Mapping[str, str] | None = None,
        reason: str | None = None,
        forced: bool = False,
    ) -> dict[str, Any]:
        return {
            "event_id": uuid.uuid4().hex,
            "event_time": _now_ms(),
            "model_name": name,
            "kind": kind,
            "version": version,
            "alias": alias,
            "previous_version": previous_version,
            "artifact_uri": mv.artifact_uri if mv else None,
            "artifact_sha256": mv.artifact_sha256 if mv else None,
            "feature_refs": list(mv.feature_refs) if mv else [],
            "metrics": dict(mv.metrics) if mv else {},
            "metadata": dict(metadata or {}),
            "actor": self.actor,
            "reason": reason,
            "forced": forced,
        }

    def _write(self, record: dict[str, Any]) -> None:
        """Produce the event and wait until the reader has applied it (read-your-writes)."""
        self.start()
        if self._producer is None:
            self._producer = EventProducer(self.settings, self.serde, client_id=f"registry-{self.actor}")
        wait_s = self.settings.registry.write_wait_s
        self._producer.send(TOPIC, record)
        self._producer.flush(wait_s)
        with self._cond:
            if not self._cond.wait_for(lambda: self.state.seen(record["event_id"]), wait_s):
                raise HeadwaterError(
                    f"registry event {record['kind']} of {record['model_name']} was written but not read "
                    f"back within {wait_s}s: is the broker up? (settings.registry.write_wait_s)"
                )
        log.info(
            "%s %s v%s%s by %s",
            record["kind"],
            record["model_name"],
            record["version"],
            f" @{record['alias']}" if record["alias"] else "",
            self.actor,
        )

    def register(
        self,
        name: str,
        artifact: bytes,
        *,
        feature_refs: Sequence[str] = (),
        metrics: Mapping[str, float] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ModelVersion:
        """Store the artifact and register it as the model's next version; the same artifact
        (sha256) registered again returns the existing version."""
        if not _NAME.match(name):
            raise ConfigError(
                f"bad model name {name!r}: lower case letters, digits and _, starting with a letter"
            )
        sha256 = sha256_of(artifact)
        with self.view() as state:
            existing = state.find_artifact(name, sha256)
            version = state.next_version(name)
        if existing is not None:
            log.info("%s: artifact %s already registered as version %d", name, sha256[:12], existing.version)
            return existing
        uri, _ = self.artifacts.put(artifact)
        mv = ModelVersion(
            name=name,
            version=version,
            artifact_uri=uri,
            artifact_sha256=sha256,
            feature_refs=list(feature_refs),
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            metadata={},
            registered_at=0,
        )
        self._write(
            self._event(name, "VERSION_REGISTERED", version, mv=mv, metadata=_metadata_json(metadata or {}))
        )
        with self.view() as state:
            return state.version(name, version)

    def promote(
        self,
        name: str,
        version: int,
        alias: str = DEFAULT_ALIAS,
        *,
        policy: PromotionPolicyLike | None = None,
        evaluator: Evaluator | None = None,
        force: bool = False,
        reason: str | None = None,
    ) -> ModelVersion:
        """Move ``alias`` to ``version`` through the promotion gate (see :mod:`registry.gate`)."""
        if not _ALIAS.match(alias):
            raise ConfigError(f"bad alias {alias!r}: lower case letters, digits, _ and -")
        reason = (reason or "").strip() or None
        if force and reason is None:
            raise PromotionRefused(
                f"forcing a promotion of {name}:{version} to {alias} needs a reason (--reason)"
            )
        with self.view() as state:
            candidate = state.version(name, version)
            incumbent_v = state.alias(name, alias)
            incumbent = state.version(name, incumbent_v) if incumbent_v is not None else None
            last_move = state.last_promotion_ms(name, alias)
        if candidate.archived:
            raise PromotionRefused(f"{name}:{version} is archived and cannot be promoted; register it again")
        if incumbent_v == version:
            raise PromotionRefused(f"{name}@{alias} already points at version {version}")
        metadata: dict[str, Any] = {}
        if not force and alias not in self.settings.registry.gated_aliases:
            metadata["gate"] = {"message": f"{alias} is not gated (settings.registry.gated_aliases)"}
        elif not force:
            # The incumbent's policy holds too (stricter wins): see registry.gate.
            policies = promotion_policies(
                candidate.metadata.get("spec"),
                incumbent.metadata.get("spec") if incumbent is not None else None,
                policy,
                has_incumbent=incumbent is not None,
            )
            gate = policies[0]
            scores: Callable[[str], tuple[float, float]] | None = None
            if incumbent is not None:
                if evaluator is None:
                    raise ConfigError(
                        f"promoting {name}:{version} over {name}@{alias} (version {incumbent_v}) needs an "
                        "evaluator to score both on the candidate's holdout"
                    )
                scores = lambda metric: evaluator(candidate, incumbent, metric)  # noqa: E731 - called only past the cooldown
            decision = check_promotion(
                policies, target=f"{name}@{alias}", last_move_ms=last_move, now_ms=_now_ms(), scores=scores
            )
            if not decision.allowed:
                raise PromotionRefused(
                    f"promotion of {name}:{version} to {alias} refused: {decision.message}"
                )
            metadata["gate"] = {
                "metric": gate.metric,
                "higher_is_better": gate.higher_is_better,
                "min_improvement": gate.min_improvement,
                "cooldown_s": gate.cooldown_s,
                "candidate_score": decision.candidate_score,
                "incumbent_score": decision.incumbent_score,
                "message": decision.message,
                "scores": {m: list(pair) for m, pair in decision.scores.items()},
            }
        self._write(
            self._event(
                name,
                "ALIAS_MOVED",
                version,
                mv=candidate,
                alias=alias,
                previous_version=incumbent_v,
                metadata=_metadata_json(metadata),
                reason=reason,
                forced=force,
            )
        )
        return candidate

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS, *, reason: str) -> ModelVersion:
        """Move ``alias`` back to the version it pointed at before (no gate, no cooldown)."""
        reason = (reason or "").strip()
        if not reason:
            raise ConfigError(f"a rollback of {name}@{alias} needs a reason (--reason)")
        with self.view() as state:
            current = state.alias(name, alias)
            if current is None:
                state.versions(name)  # NotFoundError for an unknown model
                known = ", ".join(state.aliases(name)) or "none"
                raise NotFoundError(f"model {name!r} has no alias {alias!r} to roll back; aliases: {known}")
            target = state.rollback_target(name, alias)
            if target is None:
                raise NotFoundError(
                    f"{name}@{alias} (version {current}) has no earlier version to roll back to"
                )
            mv = state.version(name, target)
        metadata = _metadata_json({"rollback": True, "rolled_back_from": current})
        self._write(
            self._event(
                name, "ALIAS_MOVED", target, mv=mv, alias=alias, previous_version=current,
                metadata=metadata, reason=reason,
            )
        )  # fmt: skip
        return mv

    def archive(self, name: str, version: int, *, reason: str | None = None) -> ModelVersion:
        """Retire a version: it can no longer be promoted. Refused while an alias or shadow uses it."""
        with self.view() as state:
            mv = state.version(name, version)
            aliases = state.aliases_of(name, version)
            shadowing = [a for a, vs in state.all_shadows(name).items() if version in vs]
        if aliases:
            raise HeadwaterError(
                f"{name}:{version} is what {', '.join(f'{name}@{a}' for a in aliases)} points at: "
                "promote another version or roll back first"
            )
        if shadowing:
            raise HeadwaterError(f"{name}:{version} shadows {', '.join(shadowing)}: detach the shadow first")
        if mv.archived:
            return mv
        # Compaction keeps only this event for name:version, so it repeats the whole version.
        metadata = _metadata_json({**mv.metadata, "registered_at": mv.registered_at})
        self._write(self._event(name, "VERSION_ARCHIVED", version, mv=mv, metadata=metadata, reason=reason))
        return mv

    def attach_shadow(self, name: str, alias: str, version: int) -> ModelVersion:
        """Run ``version`` in the shadow of ``alias`` (predictions logged, never returned)."""
        with self.view() as state:
            mv = state.version(name, version)
            attached = version in state.shadows(name, alias)
            if state.alias(name, alias) == version:
                raise HeadwaterError(
                    f"{name}@{alias} already points at version {version}: it cannot shadow itself"
                )
        if mv.archived:
            raise HeadwaterError(f"{name}:{version} is archived and cannot shadow {alias}")
        if not attached:
            self._write(self._event(name, "SHADOW_ATTACHED", version, mv=mv, alias=alias))
        return mv

    def detach_shadow(self, name: str, alias: str, version: int) -> ModelVersion:
        with self.view() as state:
            mv = state.version(name, version)
            shadows = state.shadows(name, alias)
        if version not in shadows:
            raise NotFoundError(
                f"{name}:{version} does not shadow {alias}; shadows of {name}@{alias}: "
                f"{', '.join(map(str, shadows)) or 'none'}"
            )
        self._write(self._event(name, "SHADOW_DETACHED", version, mv=mv, alias=alias))
        return mv

    # -- reading -------------------------------------------------------------------------------
    def resolve(self, ref: str) -> ModelVersion:
        with self.view() as state:
            return state.resolve(ref)

    def load_artifact(self, mv: ModelVersion) -> bytes:
        """The version's artifact bytes, verified against its sha256 (ArtifactIntegrityError if not)."""
        return self.artifacts.get(mv.artifact_uri, mv.artifact_sha256)

    # -- lineage -------------------------------------------------------------------------------
    def versions_using(self, feature_ref: str) -> list[ModelVersion]:
        """Versions that read ``feature_ref`` (``set:feature``), or any feature of a set (``set``)."""
        with self.view() as state:
            every = state.all_versions()
        if ":" in feature_ref:
            return [mv for mv in every if feature_ref in mv.feature_refs]
        prefix = f"{feature_ref}:"
        return [mv for mv in every if any(r.startswith(prefix) for r in mv.feature_refs)]

    def trained_on(self, name: str, version: int) -> dict[str, Any]:
        """What the version was trained on: the training data reference and how it was built."""
        mv = self.resolve(f"{name}:{version}")
        meta = mv.metadata
        return {
            "model": mv.ref,
            "training_data": meta.get("training_data"),
            "feature_refs": list(mv.feature_refs),
            "params": meta.get("params"),
            "code_version": meta.get("code_version"),
            "package_versions": meta.get("package_versions"),
            "holdout_uri": meta.get("holdout_uri"),
            "registered_at": mv.registered_at,
        }

    def consumers(self, name: str) -> list[str]:
        """Who consumes the model: its specs' declared consumers and the clients seen in predictions."""
        with self.view() as state:
            versions = state.versions(name)
        declared: set[str] = set()
        for mv in versions:
            listed = mv.metadata.get("consumers")
            if listed is None and isinstance(mv.metadata.get("spec"), Mapping):
                listed = mv.metadata["spec"].get("consumers")
            declared.update(str(c) for c in listed or ())
        return sorted(declared | set(prediction_clients(self.settings, name)))
