"""Scoring a candidate and the incumbent on the candidate's holdout, for the promotion gate.

The holdout (Parquet bytes) is an artifact like the model, referenced by the candidate's
metadata ``holdout_uri`` / ``holdout_sha256`` and verified on load; both versions' pipelines
are loaded with ``models.artifact.load_pipeline`` (skops with a trusted-type allowlist) and
scored with ``pipeline.evaluate(holdout)[metric]``. Comparing on the same rows is what makes
the two numbers comparable.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Any

from headwater.errors import HeadwaterError, NotFoundError
from registry.gate import Evaluator, policy_from_spec
from registry.state import ModelVersion

if TYPE_CHECKING:
    from registry.registry import Registry

__all__ = ["holdout_evaluator", "load_holdout"]

log = logging.getLogger(__name__)


def load_holdout(registry: Registry, mv: ModelVersion) -> Any:
    """The version's holdout as a pandas DataFrame (verified against its sha256)."""
    import pandas as pd

    uri, sha256 = mv.metadata.get("holdout_uri"), mv.metadata.get("holdout_sha256")
    if not uri or not sha256:
        raise NotFoundError(
            f"{mv.ref} has no holdout in its metadata (holdout_uri/holdout_sha256): it cannot be "
            "compared with the incumbent; re-register it from a training run, or --force with a --reason"
        )
    return pd.read_parquet(io.BytesIO(registry.artifacts.get(str(uri), str(sha256))))


def holdout_evaluator(registry: Registry, repository: Any, *, metric: str | None = None) -> Evaluator:
    """An evaluator scoring (candidate, incumbent) on the candidate's holdout by the metric the gate
    asks for (else ``metric``, else the candidate spec's promotion metric). Both pipelines are
    evaluated once per pair: a gate comparing on two metrics (two policies) reuses the results."""
    last: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = {}  # the latest pair only

    def evaluate(
        candidate: ModelVersion, incumbent: ModelVersion, gate_metric: str | None = None
    ) -> tuple[float, float]:
        from models.artifact import load_pipeline  # the MODELS package: only needed to score

        name = gate_metric or metric or policy_from_spec(candidate.metadata.get("spec")).metric
        pair = (candidate.ref, incumbent.ref)
        if pair not in last:
            holdout = load_holdout(registry, candidate)
            cand, inc = (
                load_pipeline(registry.load_artifact(mv), repository).evaluate(holdout)
                for mv in (candidate, incumbent)
            )
            last.clear()
            last[pair] = (cand, inc)
        scores = []
        for mv, result in zip((candidate, incumbent), last[pair], strict=True):
            if name not in result:
                raise HeadwaterError(
                    f"{mv.ref} does not report metric {name!r} on the holdout; it reports: "
                    f"{', '.join(result)}"
                )
            scores.append(float(result[name]))
        log.info(
            "%s on %s's holdout: candidate %.6g, incumbent %s %.6g",
            name,
            candidate.ref,
            scores[0],
            incumbent.ref,
            scores[1],
        )
        return scores[0], scores[1]

    return evaluate
