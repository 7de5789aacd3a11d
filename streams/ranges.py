"""The numeric rules of Avro ``int``, ``long``, ``float`` and ``double`` that fastavro does not check.

fastavro writes whatever fits its C types: an ``int`` field takes ``2**40`` (a varint like any
long), ``1.5`` (written as 1) and ``True`` (1); a ``float`` field takes ``1e300`` (written as
infinity). Reading, it returns an ``int`` field's ``2**40`` as it was written. A value outside
its type then travels on to whatever trusts the type: the lake's typed Parquet columns refused
an ``int`` of 2**40 and stopped the lake sink. :class:`streams.serde.Serde` applies these rules
where its compiled fast path (which writes and reads only in-range values of the exact types)
hands over to fastavro, on encoding and on decoding alike.

The rules, per Avro type:

* ``int``: an integer in [-2**31, 2**31 - 1]; ``long``: in [-2**63, 2**63 - 1].
* A ``float`` is refused for ``int`` and ``long``, even ``2.0``: a float that happens to be whole
  today is a fraction tomorrow, and fastavro would write ``1.9`` as 1 without a word.
* A ``bool`` is refused for every number type: Python's ``bool`` is an ``int`` only by accident
  of history, Avro has a boolean type of its own, and ``True`` in a count or a version number is
  a bug at the writer far more often than a way of writing 1.
* ``float``: a finite value whose float32 rounding overflows (beyond ±3.4028235e38) is refused:
  it would be written as infinity. NaN and ±infinity themselves are kept: IEEE-754 float32
  holds them exactly, so writing them changes nothing, the Avro specification allows them (as
  ``double`` fields do), and what they mean is for the reader to decide (a feature processor
  may reject them; the serde cannot know).
* Integers are accepted for ``float`` and ``double`` (Avro's own int-to-float promotion), within
  the type's range.

Anything that is not a number where a number is expected is left to fastavro, which refuses it.
A union is checked with the branch fastavro would take: an integer in range of an ``int`` or
``long`` branch, else a ``double`` branch, else a ``float`` branch.
"""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from streams.fastpath import type_name

__all__ = ["OutOfRange", "compile_check"]

Check = Callable[[Any], None]

_INT_RANGES = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_FLOAT32_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]
_pack_float32 = struct.Struct("<f").pack
_NUMBERS = {"int", "long", "float", "double"}
_SCALARS = {"null", "boolean", "string", "bytes"}
_MISSING = object()


class OutOfRange(ValueError):  # noqa: N818 - named for what the value is
    """A value outside its Avro type's numbers; ``path`` says where it sits in the record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []

    def __str__(self) -> str:
        where = "".join(p if p.startswith("[") else f".{p}" for p in self.path).lstrip(".")
        return f"{where}: {self.reason}" if where else self.reason


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _integer_check(kind: str) -> Check:
    lo, hi = _INT_RANGES[kind]

    def check(v: Any) -> None:
        if type(v) is int:  # the usual case first: exact type, no ABC lookups
            if lo <= v <= hi:
                return
        elif isinstance(v, bool):
            raise OutOfRange(f"{v} is a bool; an Avro {kind} takes integers only (write 1 or 0)")
        elif isinstance(v, numbers.Integral):  # numpy integers and the like
            check(int(v))
            return
        elif isinstance(v, numbers.Real):
            raise OutOfRange(f"{_shown(v)} is a float; an Avro {kind} takes integers only")
        else:
            return  # not a number at all: fastavro refuses it with its own message
        raise OutOfRange(f"{_shown(v)} is out of range for an Avro {kind} ({lo}..{hi})")

    return check


def _real_check(kind: str) -> Check:
    def check(v: Any) -> None:
        if type(v) is float:  # the usual case first
            if kind == "double" or not _overflows_float32(v):
                return
        elif isinstance(v, bool):
            raise OutOfRange(f"{v} is a bool; an Avro {kind} takes numbers only")
        elif not isinstance(v, numbers.Real):
            return  # fastavro refuses it
        else:
            try:
                x = float(v)
            except OverflowError:  # an integer beyond any float
                raise OutOfRange(f"{_shown(v)} is out of range for an Avro {kind}") from None
            if kind == "double" or not _overflows_float32(x):
                return
        raise OutOfRange(f"{_shown(v)} is out of range for an Avro float (±{_FLOAT32_MAX:.8g}; use a double)")

    return check


def _overflows_float32(x: float) -> bool:
    """A finite double that float32 rounding would turn into infinity (NaN and infinity do not)."""
    if -_FLOAT32_MAX <= x <= _FLOAT32_MAX or not math.isfinite(x):
        return False
    try:
        _pack_float32(x)  # rounds to the nearest float32: just past the largest may round down
    except OverflowError:
        return True
    return False


class _Compiler:
    """Builds a check per (sub)schema, or None where nothing under it is a number."""

    def __init__(self) -> None:
        self.named: dict[str, Any] = {}
        self.defining: set[str] = set()

    def resolve(self, schema: Any) -> Any:
        if isinstance(schema, str) and schema not in _NUMBERS | _SCALARS:
            return self.named.get(schema, "null")  # an unknown name: fastavro's to judge
        if isinstance(schema, dict) and schema.get("type") in ("record", "enum", "fixed"):
            self.named[schema["name"]] = schema
        return schema

    def check(self, schema: Any) -> Check | None:
        schema = self.resolve(schema)
        kind = type_name(schema)
        if kind in _INT_RANGES:
            return _integer_check(kind)
        if kind in ("float", "double"):
            return _real_check(kind)
        if kind == "record":
            if schema["name"] in self.defining:
                return None  # a recursive type: its values are left to fastavro
            self.defining.add(schema["name"])
            fields = [(f["name"], self.check(f["type"])) for f in schema["fields"]]
            self.defining.discard(schema["name"])
            return _record_check([(n, c) for n, c in fields if c is not None])
        if kind == "array":
            return _each(self.check(schema["items"]), _items)
        if kind == "map":
            return _each(self.check(schema["values"]), _entries)
        if kind == "union":
            return self._union(schema)
        return None

    def _union(self, union: list[Any]) -> Check | None:
        branches = [self.resolve(b) for b in union]
        kinds = [type_name(b) for b in branches]
        checks = [self.check(b) for b in branches]
        if all(c is None for c in checks):
            return None
        ints = [k for k in kinds if k in _INT_RANGES]
        real = "double" if "double" in kinds else ("float" if "float" in kinds else None)
        names = {
            b if isinstance(b, str) else b.get("name", k): c
            for b, k, c in zip(branches, kinds, checks, strict=True)
        }

        def containers(of: tuple[str, ...]) -> Check | None:
            found = [c for k, c in zip(kinds, checks, strict=True) if k in of]
            return found[0] if len(found) == 1 else None  # several: fastavro picks, not checked here

        mapping, sequence = containers(("record", "map")), containers(("array",))
        widest = "long" if "long" in ints else ("int" if ints else None)
        lo, hi = _INT_RANGES[widest] if widest else (0, -1)  # the integers an int branch takes
        integer_check = _integer_check(widest) if widest else None
        real_check = _real_check(real) if real else None
        numeric = integer_check or real_check
        boolean = "boolean" in kinds

        def check(v: Any) -> None:
            t = type(v)
            if t is int:
                if lo <= v <= hi:
                    return
                if real_check is not None:
                    real_check(v)
                elif integer_check is not None:
                    integer_check(v)
            elif t is float:
                if real_check is not None:
                    real_check(v)
                elif integer_check is not None:
                    integer_check(v)
            elif v is None or t is str or t is bytes:
                return  # a null, string or bytes branch, or none: fastavro decides
            elif t is bool:
                if not boolean and numeric is not None:
                    numeric(v)  # refused with the reason
            elif t is tuple and len(v) == 2 and isinstance(v[0], str) and v[0] in names:
                inner = names[v[0]]  # fastavro's tuple notation: (branch name, value)
                if inner is not None:
                    inner(v[1])
            elif isinstance(v, Mapping):
                if mapping is not None:
                    mapping(v)
            elif isinstance(v, list | tuple):
                if sequence is not None:
                    sequence(v)
            elif isinstance(v, numbers.Integral):  # numpy and the like
                check(int(v))
            elif isinstance(v, numbers.Real):
                check(float(v))

        return check


def _record_check(fields: list[tuple[str, Check]]) -> Check | None:
    if not fields:
        return None

    def check(v: Any) -> None:
        if type(v) is not dict and not isinstance(v, Mapping):
            return  # fastavro refuses it
        get = v.get
        for name, inner in fields:
            value = get(name, _MISSING)
            if value is not _MISSING:  # a missing field takes its default, or fastavro refuses it
                try:
                    inner(value)
                except OutOfRange as exc:
                    exc.path.insert(0, name)
                    raise

    return check


def _items(v: Any) -> Iterable[tuple[Any, Any]]:
    return enumerate(v) if isinstance(v, list | tuple) else ()


def _entries(v: Any) -> Iterable[tuple[Any, Any]]:
    return v.items() if isinstance(v, Mapping) else ()


def _each(inner: Check | None, items: Callable[[Any], Iterable[tuple[Any, Any]]]) -> Check | None:
    """A check of every item of an array (by index) or value of a map (by key)."""
    if inner is None:
        return None

    def check(v: Any) -> None:
        for where, item in items(v):
            try:
                inner(item)
            except OutOfRange as exc:
                exc.path.insert(0, f"[{_shown(where)}]")
                raise

    return check


def compile_check(schema: Any) -> Check | None:
    """A function raising :class:`OutOfRange` for a record (as written or as read) of a parsed
    schema that breaks the rules of the module docstring; None if the schema has no number."""
    return _Compiler().check(schema)
