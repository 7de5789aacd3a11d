"""The serving side of Headwater: the gRPC prediction service (:mod:`serving.server`), its API
(:mod:`serving.api.v1`), the model runtime that follows the registry, and the online store.

Kept free of heavy imports: ``headwater up`` reads :data:`READY_LINE` from here.
"""

__all__ = ["READY_LINE"]

#: Printed by `headwater serve` once it answers calls (infra/services.py waits for it).
READY_LINE = "serving ready:"
