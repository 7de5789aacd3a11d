"""The topic catalog: every Headwater topic, its event type, key and retention.

Names get the configured prefix. Compacted topics (``models``, ``experiments``,
``bandit-state``, ``feature-updates``) are the system of record for slowly changing state;
their key decides what compaction keeps, so the key of each record is derived here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from headwater.errors import HeadwaterError, NotFoundError
from headwater.settings import Settings

__all__ = ["TOPICS", "TopicCatalog", "TopicSpec"]

KeyFn = Callable[[dict[str, Any]], str]
WEEK_MS = 7 * 24 * 3600 * 1000


def _model_key(r: dict[str, Any]) -> str:
    # Versions, aliases and shadows are separate keys, so compaction keeps every version, the
    # latest position of every alias and the latest state of every (alias, shadow version).
    if str(r.get("kind")) in ("SHADOW_ATTACHED", "SHADOW_DETACHED"):
        return f"{r['model_name']}@{r['alias']}#shadow:{r['version']}"
    if r.get("alias") is not None:  # optional in the schema: absent means a version event
        return f"{r['model_name']}@{r['alias']}"
    return f"{r['model_name']}:{r['version']}"


@dataclass(frozen=True)
class TopicSpec:
    """One logical topic (without prefix)."""

    logical: str
    event_type: str
    key: KeyFn
    compacted: bool = False
    retention_ms: int = WEEK_MS
    partitions: int | None = None  # None: settings.default_partitions

    def configs(self) -> dict[str, str]:
        # Explicit configs always: Tansu answers an empty config otherwise (DESIGN.md §3).
        if self.compacted:
            return {"cleanup.policy": "compact", "retention.ms": "-1"}
        return {"cleanup.policy": "delete", "retention.ms": str(self.retention_ms)}


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("clicks", "click", lambda r: r["user_id"]),
    TopicSpec("outcomes", "outcome", lambda r: r["entity_key"]),
    TopicSpec(
        "feature-updates", "feature_update", lambda r: f"{r['feature_set']}|{r['entity_key']}", compacted=True
    ),
    TopicSpec("predictions", "prediction", lambda r: r["entity_key"]),
    TopicSpec("assignments", "assignment", lambda r: r["unit_id"]),
    TopicSpec("prediction-outcomes", "prediction_outcome", lambda r: r["prediction_id"]),
    TopicSpec("models", "model_event", _model_key, compacted=True, partitions=1),
    TopicSpec("experiments", "experiment_event", lambda r: r["experiment_id"], compacted=True, partitions=1),
    TopicSpec("bandit-state", "bandit_state", lambda r: r["experiment_id"], compacted=True, partitions=1),
    TopicSpec("alerts", "alert", lambda r: r["subject"], partitions=1),
    TopicSpec("dead-letters", "dead_letter", lambda r: r["source_topic"], retention_ms=4 * WEEK_MS),
)


# librdkafka's codes for "no broker answered" (as opposed to a broker refusing the request).
_UNREACHABLE = frozenset(
    (KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE)
)


class TopicCatalog:
    """Topic names with the settings' prefix, and topic creation."""

    def __init__(self, settings: Settings, specs: Iterable[TopicSpec] = TOPICS) -> None:
        self.prefix = settings.topic_prefix
        self.default_partitions = settings.default_partitions
        self._specs = {s.logical: s for s in specs}

    def spec(self, logical: str) -> TopicSpec:
        spec = self._specs.get(logical)
        if spec is None and logical.startswith(self.prefix):
            spec = self._specs.get(logical[len(self.prefix) :])
        if spec is None:
            raise NotFoundError(f"unknown topic {logical!r}; known: {', '.join(self._specs)}")
        return spec

    def name(self, logical: str) -> str:
        return self.prefix + self.spec(logical).logical

    def specs(self) -> list[TopicSpec]:
        return list(self._specs.values())

    def partitions(self, spec: TopicSpec) -> int:
        return spec.partitions or self.default_partitions

    def create_all(self, admin: AdminClient, timeout_s: float = 15.0) -> list[str]:
        """Create every missing topic; returns the names created. Existing topics are left alone."""
        new = [
            NewTopic(
                self.name(s.logical),
                num_partitions=self.partitions(s),
                replication_factor=1,
                config=s.configs(),
            )
            for s in self.specs()
        ]
        created = []
        for name, future in admin.create_topics(new, request_timeout=timeout_s).items():
            try:
                future.result(timeout=timeout_s)
                created.append(name)
            except KafkaException as exc:
                err = exc.args[0]
                if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                # No broker answers librdkafka in time either way: as a timeout of its own
                # ("Failed while waiting for controller") or of the future below.
                unreachable = isinstance(err, KafkaError) and err.code() in _UNREACHABLE
                hint = "; is the broker up? (`headwater status`)" if unreachable else ""
                raise HeadwaterError(f"could not create topic {name}: {err}{hint}") from exc
            except TimeoutError as exc:
                raise HeadwaterError(
                    f"could not create topic {name}: no answer from Kafka within {timeout_s:.0f}s; "
                    "is the broker up? (`headwater status`)"
                ) from exc
        return created
