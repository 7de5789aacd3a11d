"""Column-wise assembly of the feature matrix for models without on-demand transforms.

:meth:`models.pipeline.ModelPipeline.assemble` is the one definition of the feature vector
(training and serving): per row, each column's value, or the spec's default when it is
missing (None or NaN), with the names that fell back. It walks rows and columns in Python,
~10 us per 50-feature row, which caps a 100-entity call at ~1 ms before the model runs.

When no on-demand transform is involved, the same result can be computed at once: the
online store's :meth:`~serving.online_store.OnlineStore.get_values` returns each entity's
values in the requested order, so the values of a row are its reads' values one after the
other, then its request fields; all rows become one ``np.array(..., float64)`` (the same
conversion assemble's element assignment does: None becomes NaN, a bool 0/1, a string
raises), columns are put in the pipeline's order, and the defaults are filled in one
``np.where``. :class:`ColumnarAssembler` does that; it is built only for pipelines where it
is exactly equivalent (stored refs and request fields only), and tests/serving/test_units.py
holds it equal to ``pipeline.assemble`` on rows with missing, NaN, boolean and integer values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.pipeline import ModelPipeline
from serving.online_store import Value

__all__ = ["ColumnarAssembler"]


class ColumnarAssembler:
    """``pipeline.assemble`` for reads of stored features and request fields, column-wise."""

    def __init__(self, pipeline: ModelPipeline, reads: Sequence[tuple[str, Sequence[str]]]) -> None:
        self.columns = list(pipeline.columns)
        index = {c: j for j, c in enumerate(self.columns)}
        stored = [f"{fs}:{n}" for fs, names in reads for n in names]
        self.request_fields = [c for c in self.columns if c not in set(stored)]
        # Column of each value of a concatenated row (reads' values, then request fields).
        order = [index[c] for c in (*stored, *self.request_fields)]
        self.order: np.ndarray | None = (
            None if order == list(range(len(order))) else np.asarray(order, np.intp)
        )
        self.defaults = np.asarray(pipeline.defaults, dtype=np.float64)

    @staticmethod
    def build(
        pipeline: ModelPipeline, reads: Sequence[tuple[str, Sequence[str]]]
    ) -> ColumnarAssembler | None:
        """An assembler when it is exactly ``pipeline.assemble``, else None."""
        if pipeline.has_transforms:  # on-demand transforms run per row, inside assemble
            return None
        refs = [f"{fs}:{n}" for fs, names in reads for n in names]
        columns = set(pipeline.columns)
        request = set(pipeline.spec.request_features)
        if len(set(refs)) != len(refs) or not set(refs) <= columns or columns - set(refs) - request:
            return None
        return ColumnarAssembler(pipeline, reads)

    def assemble(
        self,
        blocks: Sequence[Sequence[Sequence[Value]]],
        fields: Sequence[Sequence[Value]] | None,
        n: int,
        matrices: Sequence[np.ndarray | None] = (),
    ) -> tuple[np.ndarray, list[list[str]], list[list[int]]]:
        """The matrix of ``n`` entities, the names that fell back per row, and their column indexes.

        ``blocks[g][i]``: the values of entity ``i`` read by read ``g`` (in the read's order);
        ``fields[i]``: its values of :attr:`request_fields` (None when there are none).
        TypeError/ValueError for a value that is not a number. ``matrices[g]``, when given and
        not None for every read, is block ``g`` already as float64 (the store's decoded rows).
        """
        if self.request_fields and fields is None:
            raise ValueError("the request fields' values are needed")
        parts = [m for m in matrices if m is not None]
        if parts and len(parts) == len(matrices):
            if self.request_fields:
                parts.append(np.array(fields, dtype=np.float64).reshape(n, len(self.request_fields)))
            values = np.hstack(parts) if len(parts) > 1 else parts[0]
            return self._finish(values, n)
        if self.request_fields:
            blocks = [*blocks, fields]  # type: ignore[list-item]
        if len(blocks) == 1:
            values = np.array(blocks[0], dtype=np.float64)
        elif len(blocks) == 2:
            values = np.array([[*a, *b] for a, b in zip(blocks[0], blocks[1], strict=True)], dtype=np.float64)
        else:
            values = np.array(
                [[v for part in parts for v in part] for parts in zip(*blocks, strict=True)], np.float64
            )
        return self._finish(values.reshape(n, len(self.columns)), n)

    def _finish(self, values: np.ndarray, n: int) -> tuple[np.ndarray, list[list[str]], list[list[int]]]:
        """Columns in the pipeline's order, and the defaults where values are missing."""
        if self.order is None:
            matrix = values
        else:
            matrix = np.empty_like(values)
            matrix[:, self.order] = values
        missing = np.isnan(matrix)
        if not missing.any():
            return matrix, [[] for _ in range(n)], [[] for _ in range(n)]
        matrix = np.where(missing, self.defaults, matrix)
        names: list[list[str]] = [[] for _ in range(n)]
        indexes: list[list[int]] = [[] for _ in range(n)]
        columns = self.columns
        for i in np.flatnonzero(missing.any(axis=1)).tolist():
            missed: list[int] = np.flatnonzero(missing[i]).tolist()
            indexes[i] = missed
            names[i] = [columns[j] for j in missed]
        return matrix, names, indexes
