"""The event-sourced model registry.

Every change (version registered, alias moved, version archived, shadow attached/detached)
is a ModelEvent on the compacted ``models`` topic; :class:`Registry` writes them and reads
them back into a :class:`RegistryState`. Artifacts live in a content-addressed store and are
verified by sha256 before they are loaded. Promotions pass a gate (:mod:`registry.gate`).
"""

from registry.artifacts import ArtifactIntegrityError, ArtifactStore, open_artifact_store
from registry.evaluation import holdout_evaluator, load_holdout
from registry.gate import Evaluator, Policy, PromotionRefused, policy_from_spec
from registry.registry import Registry
from registry.state import AliasMove, ModelVersion, RegistryState, parse_ref

__all__ = [
    "AliasMove",
    "ArtifactIntegrityError",
    "ArtifactStore",
    "Evaluator",
    "ModelVersion",
    "Policy",
    "PromotionRefused",
    "Registry",
    "RegistryState",
    "holdout_evaluator",
    "load_holdout",
    "open_artifact_store",
    "parse_ref",
    "policy_from_spec",
]
