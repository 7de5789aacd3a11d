"""Request-time (on-demand) transforms: plain Python functions, applied identically everywhere.

A transform combines stored features with values known only when a request arrives
(the slot an item is shown in, the time of day). Serving calls it per request and the
training-set builder calls it per label row, both through :func:`apply_on_demand`, so a
model never sees one formula in training and another in production::

    @on_demand(inputs=["item_activity:clicks_24h", "item_activity:impressions_24h", "position"],
               outputs={"item_ctr_at_position": float})
    def item_ctr_at_position(clicks_24h, impressions_24h, position):
        ...

Inputs are feature refs ``"<feature set>:<feature>"`` or names of request fields; the
function's parameters are the inputs' last parts (``clicks_24h``, ``position``). It
returns a dict with exactly the declared outputs, or the bare value when there is one.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from headwater.errors import ConfigError, HeadwaterError, NotFoundError

__all__ = ["OUTPUT_TYPES", "OnDemandTransform", "apply_on_demand", "on_demand"]

OUTPUT_TYPES: dict[type, str] = {int: "long", float: "double", str: "string", bool: "boolean"}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class OnDemandTransform:
    """A declared request-time transform; call it through :func:`apply_on_demand`."""

    name: str
    inputs: tuple[str, ...]
    outputs: Mapping[str, type]
    function: Callable[..., Any] = field(repr=False)
    description: str = ""

    @property
    def params(self) -> tuple[str, ...]:
        """The function parameter fed by each input, in input order."""
        return tuple(_param(i) for i in self.inputs)

    @property
    def feature_inputs(self) -> tuple[str, ...]:
        return tuple(i for i in self.inputs if ":" in i)

    @property
    def request_inputs(self) -> tuple[str, ...]:
        return tuple(i for i in self.inputs if ":" not in i)

    @property
    def refs(self) -> list[str]:
        return [f"{self.name}:{out}" for out in self.outputs]

    def __call__(self, **kwargs: Any) -> dict[str, Any]:
        try:
            result = self.function(**kwargs)
        except Exception as exc:
            raise HeadwaterError(f"on-demand transform {self.name!r} failed on {kwargs!r}: {exc}") from exc
        if not isinstance(result, Mapping):
            if len(self.outputs) != 1:
                raise HeadwaterError(
                    f"on-demand transform {self.name!r} must return a dict of {list(self.outputs)}"
                )
            result = {next(iter(self.outputs)): result}
        if set(result) != set(self.outputs):
            raise HeadwaterError(
                f"on-demand transform {self.name!r} returned {sorted(result)}; "
                f"it declares {sorted(self.outputs)}"
            )
        out: dict[str, Any] = {}
        for name, kind in self.outputs.items():
            value = result[name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if value is not None and (type(value) is not kind):
                raise HeadwaterError(
                    f"on-demand transform {self.name!r}: output {name} is {value!r}, declared {kind.__name__}"
                )
            out[name] = value
        return out


def _param(input_name: str) -> str:
    return input_name.rsplit(":", 1)[-1]


def on_demand(
    *,
    inputs: Iterable[str],
    outputs: Mapping[str, type],
    name: str | None = None,
    description: str | None = None,
) -> Callable[[Callable[..., Any]], OnDemandTransform]:
    """Declare a request-time transform; checks the function's signature against the inputs now."""
    declared_inputs = tuple(inputs)
    declared_outputs = dict(outputs)

    def wrap(function: Callable[..., Any]) -> OnDemandTransform:
        tname = name or function.__name__
        where = f"on-demand transform {tname!r}"
        if not _NAME_RE.match(tname):
            raise ConfigError(f"{where}: use lower case letters, digits and _ in its name")
        if not declared_inputs or not declared_outputs:
            raise ConfigError(f"{where}: declare inputs=[...] and outputs={{name: type}}")
        for i in declared_inputs:
            if not isinstance(i, str) or i.count(":") > 1 or not _NAME_RE.match(_param(i)):
                raise ConfigError(
                    f"{where}: input {i!r} is neither 'feature_set:feature' nor a request field name"
                )
        params = [_param(i) for i in declared_inputs]
        if len(set(params)) != len(params):
            raise ConfigError(f"{where}: inputs {list(declared_inputs)} feed the same parameter name twice")
        for out, kind in declared_outputs.items():
            if not _NAME_RE.match(out) or kind not in OUTPUT_TYPES:
                raise ConfigError(
                    f"{where}: output {out!r}: {kind!r}; outputs map lower-case names to "
                    f"{', '.join(t.__name__ for t in OUTPUT_TYPES)}"
                )
        signature = inspect.signature(function)
        accepted = [
            p.name
            for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        if sorted(accepted) != sorted(params) or len(accepted) != len(signature.parameters):
            raise ConfigError(
                f"{where}: the function takes ({', '.join(accepted)}); its inputs feed ({', '.join(params)})"
            )
        doc = description if description is not None else inspect.getdoc(function) or ""
        return OnDemandTransform(tname, declared_inputs, declared_outputs, function, doc)

    return wrap


def apply_on_demand(transform: OnDemandTransform, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the transform's outputs added. The one code path for serving and for training.

    A row gives each feature input under its ref (``"item_activity:clicks_24h"``) or its bare
    feature name (``"clicks_24h"``), and each request input under its name.
    """
    out: list[dict[str, Any]] = []
    for row in rows:
        kwargs: dict[str, Any] = {}
        for key, param in zip(transform.inputs, transform.params, strict=True):
            if key in row:
                kwargs[param] = row[key]
            elif param in row:
                kwargs[param] = row[param]
            else:
                raise NotFoundError(
                    f"on-demand transform {transform.name!r} needs input {key!r}; "
                    f"the row has {', '.join(row)}"
                )
        out.append({**row, **transform(**kwargs)})
    return out
