"""The example model specs made cheap for tests: fixed params for the trees, two optuna trials."""

from __future__ import annotations

from models.examples.clickstream import specs as example_specs
from models.spec import ModelSpec


def specs() -> list[ModelSpec]:
    out = []
    for example in example_specs():
        spec = example
        if spec.search is not None:
            spec = spec.model_copy(update={"search": spec.search.model_copy(update={"n_trials": 2})})
        if spec.estimator == "hist_gradient_boosting":
            spec = spec.model_copy(update={"params": {**spec.params, "max_iter": 30}})
        out.append(spec)
    return out
