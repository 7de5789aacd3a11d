"""msgpack cells per column, and records assembled from them in one buffer: the encoder
behind :func:`serving.online_store.columnar.encode_columns` (whose docstring gives the design).

A column becomes :class:`Cells`, one per entity: the value's msgpack bytes (tag, then
big-endian payload) and their length. :func:`encode_rows` lays the records out in one buffer,
each its cells concatenated, and wraps it in an Arrow binary array (one record per row).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from serving.online_store.base import OnlineStoreError
from serving.online_store.codec import HEADER

__all__ = [
    "I64",
    "U8",
    "Cells",
    "array_header",
    "encode_rows",
    "feature_cells",
    "header_cells",
    "max_cell_bytes",
    "raw_cells",
]

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
NIL = 0xC0


Nulls = npt.NDArray[np.bool_] | None
LONG_STRING = 512  # bytes: longer strings are copied one slice each, shorter ones all at once
STRING_GROUP_BYTES = 4 * 1024 * 1024  # string bytes indexed at once: bounds the index arrays


def _at(flat: U8, dtype: str) -> npt.NDArray[Any]:
    """``flat`` seen as overlapping ``dtype`` values, one starting at every byte.

    ``_at(flat, ">f8")[offsets] = values`` writes each value's 8 big-endian bytes at its own
    byte offset in one fancy assignment (unaligned; numpy handles it); ``"V<n>"`` copies
    n-byte rows of a matrix.
    """
    dt = np.dtype(dtype)
    return np.ndarray((len(flat) - dt.itemsize + 1,), dtype=dt, buffer=flat, strides=(1,))


@dataclass(frozen=True)
class Cells:
    """One column's msgpack cells, in one of two shapes.

    * the same width in every row: ``lengths`` is that width and ``fill`` writes the cells into
      a (rows, width) matrix, with strided writes; consecutive such columns make one matrix,
      copied into the records with a single fancy assignment per run;
    * varying widths (nulls among wider values, strings): ``lengths`` per row and ``write(flat,
      at)`` puts row i's cell at ``flat[at[i]:]``, with fancy assignments.

    Both write every byte of their cells and nothing else.
    """

    lengths: I64 | int
    fill: Callable[[U8], None] | None = None
    write: Callable[[U8, I64], None] | None = None


def _byte_cells(tags: int | U8) -> Cells:
    """Cells of one byte each: nil, booleans, fixints."""

    def fill(view: U8) -> None:
        view[:, 0] = tags

    return Cells(1, fill=fill)


def _payload_cells(nulls: Nulls, tag: int, dtype: str, values: npt.NDArray[Any]) -> Cells:
    """Cells of a tag and a fixed-size big-endian payload; ``nil`` where null."""
    size = 1 + np.dtype(dtype).itemsize
    if nulls is None:

        def fill(view: U8) -> None:
            view[:, 0] = tag
            view[:, 1:].view(dtype)[:, 0] = values  # a strided big-endian view: one pass

        return Cells(size, fill=fill)
    tags = np.where(nulls, np.uint8(NIL), np.uint8(tag))
    present = ~nulls
    payloads = values[present]

    def write(flat: U8, at: I64) -> None:
        flat[at] = tags
        _at(flat, dtype)[at[present] + 1] = payloads

    return Cells(np.where(nulls, 1, size), write=write)


def _int_form(lo: int, hi: int, signed: bool) -> tuple[int | None, int]:
    """(tag, payload bytes) of the smallest msgpack integer form holding every value in [lo, hi].

    None as the tag means fixint (the value is the tag). One form per column keeps the cells
    the same width; msgpack readers take any form, so values decode exactly as packb's.
    """
    if lo >= -32 and hi < 2**7:
        return None, 0
    if lo >= 0 or not signed:
        for tag, k in ((0xCC, 1), (0xCD, 2), (0xCE, 4)):
            if hi < 2 ** (8 * k):
                return tag, k
        return 0xCF, 8
    for tag, k in ((0xD0, 1), (0xD1, 2), (0xD2, 4)):
        if -(2 ** (8 * k - 1)) <= lo and hi < 2 ** (8 * k - 1):
            return tag, k
    return 0xD3, 8


def _int_cells(array: pa.Array, nulls: Nulls) -> Cells:
    signed = pa.types.is_signed_integer(array.type)
    lo, hi = (x.as_py() for x in pc.min_max(array).values())
    tag, k = _int_form(lo or 0, hi or 0, signed)
    values = array.cast(pa.int64() if signed else pa.uint64()).fill_null(0).to_numpy(zero_copy_only=False)
    if tag is None:  # fixint: the value's low byte is the whole cell
        low = values.astype(np.uint8)  # two's complement: -1 -> 0xff
        return _byte_cells(low if nulls is None else np.where(nulls, np.uint8(NIL), low))
    # The payload as a big-endian integer of k bytes; every value fits the form's range.
    return _payload_cells(nulls, tag, f">{'i' if signed and lo is not None and lo < 0 else 'u'}{k}", values)


def _bytes_writer(array: pa.Array, lengths: I64) -> Callable[[U8, I64], None]:
    """``write(flat, to)``: row i's bytes (``lengths[i]`` of them, from a large binary or string
    array's data) copied to ``flat[to[i]:]``, short ones all at once, long ones a slice each."""
    n = len(array)
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset : array.offset + n + 1]
    data_buffer = array.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    long_rows = np.flatnonzero(lengths > LONG_STRING).tolist()
    short = np.where(lengths > LONG_STRING, 0, lengths) if long_rows else lengths
    ends = np.cumsum(short)
    total = int(ends[-1]) if n else 0
    # Row ranges with at most STRING_GROUP_BYTES of short strings each (or a single row).
    cuts = np.searchsorted(ends, np.arange(STRING_GROUP_BYTES, total, STRING_GROUP_BYTES), side="right")
    bounds = [0, *sorted(set(cuts.tolist()) - {0, n}), n] if total else []

    def write(flat: U8, to: I64) -> None:
        for lo, hi in itertools.pairwise(bounds):  # the short strings' bytes, each to its row
            part = short[lo:hi]
            within = np.arange(int(part.sum())) - np.repeat(np.cumsum(part) - part, part)
            flat[np.repeat(to[lo:hi], part) + within] = data[np.repeat(offsets[lo:hi], part) + within]
        for row in long_rows:
            start, size = int(offsets[row]), int(lengths[row])
            flat[int(to[row]) : int(to[row]) + size] = data[start : start + size]

    return write


def _lengths(array: pa.Array, nulls: Nulls) -> I64:
    n = len(array)
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset : array.offset + n + 1]
    lengths: I64 = offsets[1:] - offsets[:-1]
    if nulls is not None:  # a null's slot may hold bytes: none are written
        lengths = np.where(nulls, 0, lengths)
    return lengths


def _string_cells(array: pa.Array, nulls: Nulls) -> Cells:
    """msgpack ``str`` forms (fixstr, str8, str16, str32) of the UTF-8 bytes."""
    array = array.cast(pa.large_string())
    lengths = _lengths(array, nulls)
    wide = (lengths >= 2**8).astype(np.int64) + (lengths >= 2**16)  # str8 0, str16 1, str32 2
    fix = lengths < 32
    header = np.where(fix, 1, 2 + wide + (lengths >= 2**16))  # 1, 2, 3 or 5 bytes
    tags = np.where(fix, 0xA0 | lengths, 0xD9 + wide).astype(np.uint8)
    if nulls is not None:
        tags[nulls] = NIL
    forms = [  # str8, str16, str32: the tag, then the length in 1, 2 or 4 big-endian bytes
        (rows, dtype)
        for size, dtype in ((2, ">u1"), (3, ">u2"), (5, ">u4"))
        if len(rows := np.flatnonzero(header == size))
    ]
    write_bytes = _bytes_writer(array, lengths)

    def write(flat: U8, at: I64) -> None:
        flat[at] = tags
        for rows, dtype in forms:
            _at(flat, dtype)[at[rows] + 1] = lengths[rows]
        write_bytes(flat, at + header)

    return Cells(header + lengths, write=write)


def raw_cells(array: pa.Array) -> Cells:
    """Each row's bytes as they are, no msgpack framing (a record's tiles); nothing for a null."""
    array = array.cast(pa.large_binary())
    lengths = _lengths(array, array.is_null().to_numpy(zero_copy_only=False) if array.null_count else None)
    return Cells(lengths, write=_bytes_writer(array, lengths))


def feature_cells(feature_set: str, name: str, array: pa.Array) -> Cells:
    """One feature column's cells; nulls are msgpack nil."""
    t = array.type
    if pa.types.is_dictionary(t):
        return feature_cells(feature_set, name, array.dictionary_decode())
    if pa.types.is_null(t) or array.null_count == len(array):
        return _byte_cells(NIL)
    nulls = array.is_null().to_numpy(zero_copy_only=False) if array.null_count else None
    if pa.types.is_boolean(t):
        flags = np.where(
            array.fill_null(False).to_numpy(zero_copy_only=False), np.uint8(0xC3), np.uint8(0xC2)
        )
        return _byte_cells(flags if nulls is None else np.where(nulls, np.uint8(NIL), flags))
    if pa.types.is_floating(t):
        array = array.cast(pa.float64())  # no copy when it is one
        if nulls is None:
            values = array.to_numpy(zero_copy_only=False)
        else:  # the values buffer as it is: what null slots hold is never written
            values = np.frombuffer(array.buffers()[1], np.float64)[array.offset : array.offset + len(array)]
        return _payload_cells(nulls, 0xCB, ">f8", values)
    if pa.types.is_integer(t):
        return _int_cells(array, nulls)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return _string_cells(array, nulls)
    raise OnlineStoreError(
        f"{feature_set}: feature {name!r} is a {t} column; values must be None, bool, int, float or str"
    )


def max_cell_bytes(array: pa.Array) -> int:
    """An upper bound of a column's cell length, to size the chunks."""
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        longest = pc.max(pc.binary_length(array)).as_py()
        return 5 + (longest or 0)
    return 9


def array_header(count: int) -> bytes:
    if count < 16:
        return bytes([0x90 | count])
    if count < 2**16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def header_cells(  # noqa: PLR0917 - the header's words, in its order
    times: I64,
    write_time: int,
    expires: I64,
    schema_id: int,
    valid_until: I64 | int,
    values_end: I64 | int,
    array_header: bytes,
) -> Cells:
    """The record header (see codec) and the msgpack array header, as the first column."""

    def fill(view: U8) -> None:
        words = view[:, : HEADER.size].view(">i8")
        words[:, 0], words[:, 1], words[:, 2], words[:, 3] = times, write_time, expires, schema_id
        words[:, 4], words[:, 5] = valid_until, values_end
        view[:, HEADER.size :] = np.frombuffer(array_header, np.uint8)

    return Cells(HEADER.size + len(array_header), fill=fill)


def _matrix(n: int, run: list[Cells]) -> U8:
    """The cells of a run of fixed-width columns, side by side: (rows, their total width)."""
    widths = [int(cell.lengths) for cell in run]
    matrix: U8 = np.empty((n, sum(widths)), np.uint8)
    column = 0
    for cell, width in zip(run, widths, strict=True):
        assert cell.fill is not None
        cell.fill(matrix[:, column : column + width])
        column += width
    return matrix


def encode_rows(n: int, cells: list[Cells], order: I64 | None = None) -> pa.LargeBinaryArray:
    """One record per row, its cells concatenated, all in one buffer: an Arrow binary array.

    With ``order``, the records of rows ``order[0], order[1], ...`` come out in that order:
    the buffer is laid out that way, only the offsets the cells are written at change.
    """
    runs: list[list[Cells]] = []  # consecutive fixed-width cells go together
    for cell in cells:
        if cell.fill is not None and runs and runs[-1][-1].fill is not None:
            runs[-1].append(cell)
        else:
            runs.append([cell])
    if len(runs) == 1:  # every cell has a fixed width: the matrix is the buffer
        matrix = _matrix(n, runs[0])
        flat = (matrix if order is None else matrix[order]).reshape(-1)
        offsets = np.arange(n + 1, dtype=np.int64) * matrix.shape[1]
    else:
        lengths = np.zeros(n, np.int64)
        for cell in cells:
            lengths += cell.lengths
        offsets = np.empty(n + 1, np.int64)
        offsets[0] = 0
        np.cumsum(lengths if order is None else lengths[order], out=offsets[1:])
        flat = np.empty(int(offsets[-1]), np.uint8)
        at = offsets[:-1].copy()  # where each row's next cell goes
        if order is not None:
            at[order] = offsets[:-1]
        for run in runs:
            if run[0].write is not None:
                run[0].write(flat, at)
                at += run[0].lengths
            else:
                matrix = _matrix(n, run)
                width = matrix.shape[1]
                _at(flat, f"V{width}")[at] = matrix.view(f"V{width}")[:, 0]
                at += width
    records: pa.LargeBinaryArray = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(flat)]
    )
    return records
