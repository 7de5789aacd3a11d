"""Model artifacts: a fitted :class:`ModelPipeline` as skops bytes, deterministic, loaded without pickle.

The archive holds the spec (JSON), the effective params (JSON), the feature columns and the
fitted estimator. On-demand transform functions are code, not data: they are not stored,
and :func:`load_pipeline` binds them again from the repository, by ref.

**Deterministic bytes.** skops writes a zip whose entries carry the wall-clock time, whose
array files are named after ``id()`` of the saved objects, and whose ``bytes`` payloads get
random uuid names; the schema repeats those ids. :func:`dump_pipeline` rewrites the archive
canonically: ids renumbered in order of first appearance, files renamed after them, fixed
entry timestamps and attributes. The same fitted model always gives the same bytes, so its
sha256 is the model's identity.

**Loading.** skops trusts scikit-learn's and numpy's own types; every other type in a file
must be in :data:`TRUSTED_TYPES` -- the types our estimators (:data:`models.estimators.ESTIMATORS`)
produce, and nothing else (a test checks the list against every estimator). A file naming any
other type is refused with :class:`ArtifactError` before anything in it is constructed.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import skops.io as sio

from features.repository import FeatureRepository
from headwater.errors import HeadwaterError
from models.pipeline import ModelPipeline
from models.spec import ModelSpec

__all__ = ["FORMAT", "TRUSTED_TYPES", "ArtifactError", "dump_pipeline", "load_pipeline"]

FORMAT = "headwater.model/1"

# Beyond skops' defaults (scikit-learn, numpy, scipy): what our estimators are made of.
TRUSTED_TYPES: frozenset[str] = frozenset(
    {
        "models.estimators.RiverLinearRegression",
        "models.estimators.RiverLogisticRegression",
        "river._river_rust.vectordict.VectorDict",
        "river.linear_model.lin_reg.LinearRegression",
        "river.linear_model.log_reg.LogisticRegression",
        "river.optim.initializers.Zeros",
        "river.optim.losses.Log",
        "river.optim.losses.Squared",
        "river.optim.schedulers.Constant",
        "river.optim.sgd.SGD",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn.tree._tree.Tree",
    }
)

_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


class ArtifactError(HeadwaterError):
    """An artifact cannot be loaded: not a Headwater model file, or it names untrusted types."""


def _canonical(data: bytes) -> bytes:
    """The skops archive with ids, file names and timestamps made independent of the process."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        schema = json.loads(archive.read("schema.json"))
        payloads = {name: archive.read(name) for name in archive.namelist() if name != "schema.json"}
    ids: dict[int, int] = {}
    names: dict[str, str] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "__id__" and isinstance(value, int):
                    node[key] = ids.setdefault(value, len(ids) + 1)
                elif key == "file" and isinstance(value, str) and value in payloads:
                    suffix = value[value.rfind(".") :] if "." in value else ""
                    node[key] = names.setdefault(value, f"{len(names) + 1:06d}{suffix}")
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        entries = [(new, payloads[old]) for old, new in names.items()]
        entries.append(("schema.json", json.dumps(schema, indent=2).encode()))
        for name, payload in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            archive.writestr(info, payload)
    return out.getvalue()


def dump_pipeline(pipeline: ModelPipeline) -> bytes:
    """The fitted pipeline as deterministic skops bytes."""
    if pipeline.estimator is None:
        raise HeadwaterError(f"model {pipeline.spec.name!r} is not fitted; nothing to save")
    state = {
        "format": FORMAT,
        "spec": pipeline.spec.model_dump_json(),
        "params": json.dumps(pipeline.params, sort_keys=True, default=str),
        "columns": list(pipeline.columns),
        "estimator": pipeline.estimator,
    }
    return _canonical(sio.dumps(state))


def load_pipeline(data: bytes, repository: FeatureRepository) -> ModelPipeline:
    """A pipeline from :func:`dump_pipeline` bytes; refuses files naming types outside the allowlist."""
    try:
        untrusted = set(sio.get_untrusted_types(data=data))
    except Exception as exc:  # a zip/JSON error of any kind: not a model file
        raise ArtifactError(
            f"not a Headwater model artifact ({exc}); was it written by dump_pipeline?"
        ) from exc
    refused = sorted(untrusted - TRUSTED_TYPES)
    if refused:
        raise ArtifactError(
            f"model artifact names untrusted types {', '.join(refused)}; refusing to load it. "
            "Only Headwater's estimators are loadable (models.artifact.TRUSTED_TYPES)."
        )
    try:
        state = sio.loads(data, trusted=sorted(untrusted))
    except Exception as exc:
        raise ArtifactError(f"model artifact cannot be loaded: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ArtifactError(f"not a Headwater model artifact (expected format {FORMAT!r})")
    spec = ModelSpec.model_validate_json(state["spec"])
    pipeline = ModelPipeline(spec, repository, state["estimator"], params=json.loads(state["params"]))
    if pipeline.columns != list(state["columns"]):
        raise ArtifactError(
            f"model {spec.name!r}: artifact columns {state['columns']} differ from the spec's "
            f"{pipeline.columns}"
        )
    return pipeline
