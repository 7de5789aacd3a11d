"""Reading a PredictRequest for one model: entity keys and typed request-time features.

Errors name the field of the request that is wrong, as the client wrote it
(``entities[3].keys``, ``request_features["position"]``), and say what the model needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from headwater.errors import HeadwaterError
from serving.runtime import LoadedModel

__all__ = ["InvalidRequestError", "entity_label", "parse_entities"]

_NUMBER_KINDS = frozenset({"bool_value", "int_value", "double_value"})


class InvalidRequestError(HeadwaterError):
    """A request the service cannot answer as written: INVALID_ARGUMENT, naming the field."""


def _values(values: Mapping[str, Any], where: str, wanted: frozenset[str], out: dict[str, Any]) -> None:
    """The wanted request features of a ``map<string, Value>`` into ``out``; others are ignored
    (a client may send fields a newer model version reads)."""
    for name, value in values.items():
        if name not in wanted:
            continue
        kind = value.WhichOneof("kind")
        if kind is None:
            out[name] = None  # sent without a value: missing, the spec's default applies
        elif kind in _NUMBER_KINDS:
            out[name] = getattr(value, kind)
        else:
            raise InvalidRequestError(
                f'{where}["{name}"]: got a string ({value.string_value[:40]!r}); '
                f"{name} is a number (bool_value, int_value or double_value)"
            )


def parse_entities(
    request: Any, model: LoadedModel, max_entities: int
) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Per entity: its keys, and the row the pipeline assembles (keys, request fields)."""
    entities = request.entities
    n = len(entities)
    if n == 0:
        raise InvalidRequestError(
            f"entities: none given; model {model.name} scores entities named by "
            f"{', '.join(model.entity_keys)}"
        )
    if n > max_entities:
        raise InvalidRequestError(f"entities: {n} in one request, at most {max_entities}: split the request")
    wanted = frozenset(model.request_fields)
    shared: dict[str, Any] = {}
    if request.request_features and wanted:
        _values(request.request_features, "request_features", wanted, shared)
    need = model.entity_keys
    all_keys: list[dict[str, str]] = []
    rows: list[dict[str, Any]] = []
    for i, entity in enumerate(entities):
        given = entity.keys
        keys = {}
        for name in need:
            value = given.get(name)
            if not value:
                raise InvalidRequestError(
                    f"entities[{i}].keys: {name!r} is missing or empty; model {model.name} needs "
                    f"{', '.join(need)}"
                )
            keys[name] = value
        row: dict[str, Any] = {**keys, **shared}
        if entity.features and wanted:
            _values(entity.features, f"entities[{i}].features", wanted, row)
        all_keys.append(keys)
        rows.append(row)
    return all_keys, rows


def entity_label(keys: Mapping[str, str], entity_keys: tuple[str, ...]) -> str:
    """The prediction event's ``entity_key``: the key's value, or values joined by ``|`` in the
    spec's order (``user|item``) for a model keyed by several."""
    if len(entity_keys) == 1:
        return keys[entity_keys[0]]
    return "|".join(keys[k] for k in entity_keys)
