"""Reading a PredictRequest for one model: entity keys and typed request-time features.

A request names its entities one message each (``entities``) or column-wise
(``key_columns``); either way the call gets one :class:`Entities`, keys as columns (what the
feature reads take), rows built only when the pipeline needs them.

Errors name the field of the request that is wrong, as the client wrote it
(``entities[3].keys``, ``key_columns["item_id"]``, ``request_features["position"]``), and say
what the model needs. Key values longer than ``max_key_length`` are refused (the service's
``serving.max_id_length``): keys travel in every prediction event and its Kafka key, so this
is what keeps an event under the broker's message limit whatever a client sends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from headwater.errors import HeadwaterError
from serving.runtime import LoadedModel

__all__ = ["Entities", "InvalidRequestError", "parse_entities"]

_NUMBER_KINDS = frozenset({"bool_value", "int_value", "double_value"})


class InvalidRequestError(HeadwaterError):
    """A request the service cannot answer as written: INVALID_ARGUMENT, naming the field."""


@dataclass(slots=True)
class Entities:
    """The entities of one call for one model."""

    keys: dict[str, list[str]]  # each of the model's entity keys: its value per entity
    labels: list[str]  # per entity, the prediction event's entity_key (values joined by "|")
    shared: dict[str, Any]  # request fields of every entity
    fields: list[dict[str, Any]] | None  # per entity, its own request fields (None: none has any)
    columnar: bool  # asked column-wise: answered column-wise
    _rows: list[dict[str, Any]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self) -> list[dict[str, Any]]:
        """Per entity, its keys and request fields: what the pipeline assembles (built once;
        the scoring pass adds the features it read)."""
        if self._rows is None:
            names, shared = list(self.keys), self.shared
            rows = [
                {**dict(zip(names, values, strict=True)), **shared}
                for values in zip(*self.keys.values(), strict=True)
            ]
            if self.fields is not None:
                for row, own in zip(rows, self.fields, strict=True):
                    row.update(own)
            self._rows = rows
        return self._rows

    def subset(self, at: list[int]) -> Entities:
        """The entities at positions ``at``, in that order (their rows, if built, are shared)."""
        rows = self._rows
        return Entities(
            {name: [values[i] for i in at] for name, values in self.keys.items()},
            [self.labels[i] for i in at],
            self.shared,
            None if self.fields is None else [self.fields[i] for i in at],
            self.columnar,
            None if rows is None else [rows[i] for i in at],
        )

    def request_values(self, names: list[str]) -> list[list[Any]]:
        """Per entity, the values of request fields ``names`` (None where not given)."""
        if self.fields is None:
            return [[self.shared.get(name) for name in names]] * len(self)
        return [[row.get(name) for name in names] for row in self.rows()]


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


def _labels(columns: list[list[str]]) -> list[str]:
    if len(columns) == 1:
        return columns[0]
    if len(columns) == 2:
        return [f"{a}|{b}" for a, b in zip(columns[0], columns[1], strict=True)]
    return ["|".join(values) for values in zip(*columns, strict=True)]


def parse_entities(request: Any, model: LoadedModel, max_entities: int, max_key_length: int) -> Entities:
    """The request's entities for ``model``: its keys, and request fields."""
    wanted = frozenset(model.request_fields)
    shared: dict[str, Any] = {}
    if request.request_features and wanted:
        _values(request.request_features, "request_features", wanted, shared)
    if request.key_columns:
        if request.entities:
            raise InvalidRequestError("entities and key_columns: both given; send the entities one way")
        return _columns(request, model, max_entities, max_key_length, shared)
    return _rows(request, model, max_entities, max_key_length, shared, wanted)


def _too_long(where: str, length: int, max_key_length: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"{where}: {length} characters; a key value is at most {max_key_length} (serving.max_id_length)"
    )


def _count(n: int, model: LoadedModel, max_entities: int) -> None:
    if n == 0:
        raise InvalidRequestError(
            f"entities: none given; model {model.name} scores entities named by "
            f"{', '.join(model.entity_keys)}"
        )
    if n > max_entities:
        raise InvalidRequestError(f"entities: {n} in one request, at most {max_entities}: split the request")


def _rows(  # noqa: PLR0917 - private, called once
    request: Any,
    model: LoadedModel,
    max_entities: int,
    max_key_length: int,
    shared: dict[str, Any],
    wanted: frozenset[str],
) -> Entities:
    entities = request.entities
    _count(len(entities), model, max_entities)
    need = model.entity_keys
    columns: list[list[str]] = [[] for _ in need]
    adds = [column.append for column in columns]
    fields: list[dict[str, Any]] | None = None
    for i, entity in enumerate(entities):
        given = entity.keys
        for name, add in zip(need, adds, strict=True):
            value = given.get(name)
            if not value:
                raise InvalidRequestError(
                    f"entities[{i}].keys: {name!r} is missing or empty; model {model.name} needs "
                    f"{', '.join(need)}"
                )
            if len(value) > max_key_length:
                raise _too_long(f'entities[{i}].keys["{name}"]', len(value), max_key_length)
            add(value)
        if entity.features and wanted:
            own: dict[str, Any] = {}
            _values(entity.features, f"entities[{i}].features", wanted, own)
            if fields is None:
                fields = [{} for _ in range(len(entities))]
            fields[i] = own
    return Entities(dict(zip(need, columns, strict=True)), _labels(columns), shared, fields, False)


def _columns(
    request: Any, model: LoadedModel, max_entities: int, max_key_length: int, shared: dict[str, Any]
) -> Entities:
    given: dict[str, list[str]] = {}
    for column in request.key_columns:
        if column.name in given:
            raise InvalidRequestError(f"key_columns: {column.name!r} given twice")
        given[column.name] = list(column.values)
    need = model.entity_keys
    for name in need:
        if name not in given:
            raise InvalidRequestError(
                f"key_columns: no column {name!r}; model {model.name} needs {', '.join(need)}"
            )
    n = max(len(given[name]) for name in need)
    _count(n, model, max_entities)
    columns = []
    for name in need:
        values = given[name]
        longest = max(map(len, values))  # before a one-for-all value is repeated: checked once
        if longest > max_key_length:
            at = next(i for i, v in enumerate(values) if len(v) == longest)
            raise _too_long(f'key_columns["{name}"][{at}]', longest, max_key_length)
        if len(values) == 1 and n > 1:
            values = values * n  # one value for every entity
        elif len(values) != n:
            raise InvalidRequestError(
                f'key_columns["{name}"]: {len(values)} values for {n} entities; give one per entity, '
                "or one for all"
            )
        if "" in values:
            raise InvalidRequestError(f'key_columns["{name}"][{values.index("")}]: empty')
        columns.append(values)
    return Entities(dict(zip(need, columns, strict=True)), _labels(columns), shared, None, True)
