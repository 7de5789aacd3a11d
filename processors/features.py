"""The streaming feature processor: one feature set's source events -> feature-update events.

Pure logic: :class:`features.engine.Aggregator` folds each event into its entity's state and
returns the updates; this class only adapts it to the runtime (rejected events become dead
letters with the engine's reason, state goes to the runner's store).
"""

from __future__ import annotations

from collections.abc import MutableMapping

from features.definitions import FeatureSet
from features.engine import Aggregator, EntityState, EventRejected
from processors.runtime import Effects
from streams.consumer import Event

__all__ = ["FeatureProcessor"]


class FeatureProcessor:
    """Computes one feature set from its source topic."""

    def __init__(self, feature_set: FeatureSet, states: MutableMapping[str, EntityState]) -> None:
        self.name = f"features-{feature_set.name}"
        self.inputs = [feature_set.source]
        # Entities other than the topic key (items on a user-keyed topic) span partitions.
        self.event_time_aligned = True
        self.feature_set = feature_set
        self._states = states
        self.aggregator = Aggregator(feature_set, states)

    def handle(self, events: list[Event], write_time_ms: int) -> Effects:
        effects = Effects()
        apply, outputs = self.aggregator.apply, effects.outputs
        for event in events:
            try:
                updates = apply(event.record, write_time_ms)
            except EventRejected as exc:
                effects.rejected.append((event, exc))
                continue
            outputs.extend(("feature-updates", update) for update in updates)
        return effects

    def should_flush(self, now_s: float) -> bool:
        return True  # every batch: state and store writes stay small and freshness high

    def flush_effects(self) -> None:
        """Feature updates are Kafka outputs; nothing else to make durable."""

    def state_changes(self) -> dict[str, bytes | None]:
        changes = getattr(self._states, "changes", None)
        return changes() if changes is not None else {}
