"""Model specs, the Model Pipeline (pre -> estimator -> post), training and safe artifacts.

Submodules: :mod:`models.spec`, :mod:`models.estimators`, :mod:`models.metrics`,
:mod:`models.tuning`, :mod:`models.pipeline`, :mod:`models.artifact`, :mod:`models.training`
(which pulls in the offline store and the SDK; import it where training happens).
"""

from __future__ import annotations

from models.artifact import dump_pipeline, load_pipeline
from models.pipeline import ModelPipeline, Prediction
from models.spec import ModelSpec, PostSpec, PromotionPolicy, SearchSpec, load_specs

__all__ = [
    "ModelPipeline",
    "ModelSpec",
    "PostSpec",
    "Prediction",
    "PromotionPolicy",
    "SearchSpec",
    "dump_pipeline",
    "load_pipeline",
    "load_specs",
]
