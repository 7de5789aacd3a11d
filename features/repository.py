"""A feature repository: the feature sets and on-demand transforms one deployment serves.

Features are addressed by refs ``"<feature set>:<feature>"`` (``"user_activity:clicks_1h"``)
and on-demand outputs by ``"<transform>:<output>"``. An unknown ref raises
:class:`~headwater.errors.NotFoundError` listing the known ones.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from features.definitions import Feature, FeatureSet
from features.on_demand import OUTPUT_TYPES, OnDemandTransform
from headwater.errors import ConfigError, NotFoundError

__all__ = ["FeatureRef", "FeatureRepository"]


@dataclass(frozen=True)
class FeatureRef:
    """A resolved ref: which feature set or transform produces it, and its value type."""

    ref: str
    kind: Literal["feature", "on_demand"]
    owner: str  # feature set or transform name
    name: str
    dtype: str
    feature_set: FeatureSet | None = None
    transform: OnDemandTransform | None = None

    @property
    def feature(self) -> Feature:
        if self.feature_set is None:
            raise NotFoundError(f"{self.ref} is an on-demand output, not a stored feature")
        return self.feature_set.feature(self.name)


class FeatureRepository:
    """Named feature sets and transforms; names are unique across both."""

    def __init__(
        self, feature_sets: Iterable[FeatureSet] = (), on_demand: Iterable[OnDemandTransform] = ()
    ) -> None:
        self._sets: dict[str, FeatureSet] = {}
        self._transforms: dict[str, OnDemandTransform] = {}
        self._refs: dict[str, FeatureRef] = {}
        for fs in feature_sets:
            self.add(fs)
        for transform in on_demand:
            self.add(transform)

    def add(self, item: FeatureSet | OnDemandTransform) -> None:
        """Register a feature set, or a transform whose feature inputs are already known."""
        if item.name in self._sets or item.name in self._transforms:
            raise ConfigError(f"the repository already has a feature set or transform named {item.name!r}")
        if isinstance(item, FeatureSet):
            self._sets[item.name] = item
            for f in item.features:
                self._refs[f"{item.name}:{f.name}"] = FeatureRef(
                    f"{item.name}:{f.name}", "feature", item.name, f.name, f.dtype, feature_set=item
                )
        elif isinstance(item, OnDemandTransform):
            for ref in item.feature_inputs:
                if ref not in self._refs:
                    raise ConfigError(f"on-demand transform {item.name!r}: {self._unknown(ref)}")
            self._transforms[item.name] = item
            for out, kind in item.outputs.items():
                self._refs[f"{item.name}:{out}"] = FeatureRef(
                    f"{item.name}:{out}", "on_demand", item.name, out, OUTPUT_TYPES[kind], transform=item
                )
        else:
            raise ConfigError(f"{item!r} is neither a FeatureSet nor an on-demand transform")

    @property
    def feature_sets(self) -> list[FeatureSet]:
        return list(self._sets.values())

    @property
    def transforms(self) -> list[OnDemandTransform]:
        return list(self._transforms.values())

    def refs(self) -> list[str]:
        return list(self._refs)

    def feature_set(self, name: str) -> FeatureSet:
        if name not in self._sets:
            raise NotFoundError(f"unknown feature set {name!r}; known: {', '.join(self._sets) or 'none'}")
        return self._sets[name]

    def transform(self, name: str) -> OnDemandTransform:
        if name not in self._transforms:
            known = ", ".join(self._transforms) or "none"
            raise NotFoundError(f"unknown on-demand transform {name!r}; known: {known}")
        return self._transforms[name]

    def resolve(self, ref: str) -> FeatureRef:
        found = self._refs.get(ref)
        if found is None:
            raise NotFoundError(self._unknown(ref))
        return found

    def resolve_many(self, refs: Iterable[str]) -> list[FeatureRef]:
        """Resolve every ref, reporting all unknown ones in one error."""
        refs = list(refs)
        unknown = [r for r in refs if r not in self._refs]
        if unknown:
            raise NotFoundError(
                f"unknown feature refs {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(self._refs) or 'none'}"
            )
        return [self._refs[r] for r in refs]

    def _unknown(self, ref: str) -> str:
        close = difflib.get_close_matches(ref, self._refs, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        shape = "" if ":" in str(ref) else " Refs are written 'feature_set:feature'."
        return f"unknown feature ref {ref!r}{hint}.{shape} Known: {', '.join(self._refs) or 'none'}"

    def __iter__(self) -> Iterator[FeatureSet]:
        return iter(self._sets.values())

    def __len__(self) -> int:
        return len(self._sets)
