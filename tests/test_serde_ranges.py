"""The serde refuses numbers outside their Avro type and bytes after a record, on both paths.

Every property runs on the compiled fast path and on fastavro alone (``fast_path=False``), whose
results must agree. Out-of-range values on the wire are written with bare fastavro, which (unlike
the serde) writes them: what a lenient producer in another language or an old client sends.
"""

from __future__ import annotations

import json
import math
import struct
from io import BytesIO
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.catalog import SchemaCatalog
from streams.serde import MAGIC, DecodeError, EncodeError, Serde
from tests.avro_strategies import strategy_for
from tests.conftest import SCHEMAS

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
FLOAT32_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]

NUMBERS_SCHEMA = {
    "type": "record", "name": "Numbers", "namespace": "test", "fields": [
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "oi", "type": ["null", "int"], "default": None},
        {"name": "of", "type": ["null", "float"], "default": None},
        {"name": "ints", "type": {"type": "array", "items": "int"}, "default": []},
        {"name": "longs", "type": {"type": "map", "values": "long"}, "default": {}},
        {"name": "inner", "type": {
            "type": "record", "name": "Inner", "fields": [{"name": "n", "type": "int"}]}},
    ],
}  # fmt: skip
NUMBERS = SchemaCatalog.make_version("numbers", 1, NUMBERS_SCHEMA)
CATALOG = SchemaCatalog([*SchemaCatalog.load(SCHEMAS), NUMBERS])
SERDES = {"fast": Serde(CATALOG), "fastavro": Serde(CATALOG, fast_path=False)}
PATHS = list(SERDES)
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BASE: dict[str, Any] = {
    "i": 1, "l": 2, "f": 1.5, "d": 2.5, "oi": None, "of": None, "ints": [], "longs": {}, "inner": {"n": 3},
}  # fmt: skip
# Where each integer field sits, and the range its type allows.
INTEGER_SLOTS: list[tuple[str, Any, tuple[int, int]]] = [
    ("i", lambda v: {"i": v}, INT32),
    ("l", lambda v: {"l": v}, INT64),
    ("oi", lambda v: {"oi": v}, INT32),
    ("ints[1]", lambda v: {"ints": [0, v]}, INT32),
    ("longs['k']", lambda v: {"longs": {"k": v}}, INT64),
    ("inner.n", lambda v: {"inner": {"n": v}}, INT32),
]
WIDE_INTEGERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from(
        [INT32[0] - 1, INT32[0], INT32[1], INT32[1] + 1, INT64[0] - 1, INT64[0], INT64[1], INT64[1] + 1]
    ),
)


# Avro writes int and long alike (zigzag varints): the schema with every int a long writes the
# very bytes a lenient writer of Numbers would, with any 64-bit value in an int field.
LENIENT = parse_schema(json.loads(json.dumps(NUMBERS_SCHEMA).replace('"int"', '"long"')))


def bare_fastavro(record: dict[str, Any]) -> bytes:
    """What a lenient writer puts on the wire: the Numbers single-object encoding, unchecked."""
    buf = BytesIO()
    schemaless_writer(buf, LENIENT, record)
    return MAGIC + NUMBERS.fingerprint + buf.getvalue()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("where", "place", "bounds"), INTEGER_SLOTS, ids=[s[0] for s in INTEGER_SLOTS])
@SETTINGS
@given(value=WIDE_INTEGERS)
def test_integers_are_written_and_read_only_within_their_type(
    path: str, where: str, place: Any, bounds: tuple[int, int], value: int
) -> None:
    serde = SERDES[path]
    record = {**BASE, **place(value)}
    inside = bounds[0] <= value <= bounds[1]
    if inside:
        encoded = serde.encode("numbers", record)
        assert serde.decode(encoded) == ("numbers", record)
    else:
        with pytest.raises(EncodeError) as refused:
            serde.encode("numbers", record)
        assert f"{where}: {value} is out of range" in str(refused.value)
        assert f"({bounds[0]}..{bounds[1]})" in str(refused.value)
    if INT64[0] <= value <= INT64[1]:  # the wire holds any 64-bit value
        wire = bare_fastavro(record)
        if inside:
            assert serde.decode(wire) == ("numbers", record)
        else:
            with pytest.raises(DecodeError, match="out of range"):
                serde.decode(wire)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("where", "place", "bounds"), INTEGER_SLOTS, ids=[s[0] for s in INTEGER_SLOTS])
@pytest.mark.parametrize("value", [1.0, 1.5, -0.0, math.inf, math.nan, True, False])
def test_floats_and_bools_are_refused_for_integer_fields(
    path: str, where: str, place: Any, bounds: tuple[int, int], value: Any
) -> None:
    with pytest.raises(EncodeError) as refused:
        SERDES[path].encode("numbers", {**BASE, **place(value)})
    kind = "a bool" if isinstance(value, bool) else "a float"
    assert f"{where}: {value!r} is {kind}" in str(refused.value)
    assert "takes integers only" in str(refused.value)


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(value=st.one_of(st.floats(), st.integers(-(2**200), 2**200)), slot=st.sampled_from(["f", "of"]))
def test_floats_must_fit_float32_and_nan_and_infinity_are_kept(path: str, value: float, slot: str) -> None:
    serde = SERDES[path]
    record = {**BASE, slot: value}
    as_float = float(value)
    if math.isfinite(as_float) and abs(as_float) > FLOAT32_MAX * (1 + 2**-24):  # rounds to infinity
        with pytest.raises(EncodeError, match=f"{slot}: .* is out of range for an Avro float"):
            serde.encode("numbers", record)
        return
    _, decoded = serde.decode(serde.encode("numbers", record))
    expected = struct.unpack("<f", struct.pack("<f", as_float))[0]  # float32 rounding, independently
    got = decoded[slot]
    assert (math.isnan(got) and math.isnan(expected)) or got == expected
    assert math.isfinite(got) == math.isfinite(as_float)  # never an infinity that was not written


@pytest.mark.parametrize("path", PATHS)
def test_doubles_take_any_float_but_no_bool(path: str) -> None:
    serde = SERDES[path]
    for value in (1e300, -math.inf, 7, 2**70):
        _, decoded = serde.decode(serde.encode("numbers", {**BASE, "d": value}))
        assert decoded["d"] == float(value)
    with pytest.raises(EncodeError, match="d: True is a bool"):
        serde.encode("numbers", {**BASE, "d": True})
    with pytest.raises(EncodeError, match="out of range for an Avro double"):
        serde.encode("numbers", {**BASE, "d": 10**400})


VERSIONS = list(SchemaCatalog.load(SCHEMAS))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sv", VERSIONS, ids=[f"{sv.event_type}.v{sv.version}" for sv in VERSIONS])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), suffix=st.binary(min_size=1, max_size=12))
def test_bytes_after_the_record_are_malformed(path: str, sv: Any, data: st.DataObject, suffix: bytes) -> None:
    """Every catalog schema, read as itself or resolved to its latest version (older versions)."""
    serde = SERDES[path]
    record = data.draw(strategy_for(sv.raw))
    message = serde.encode(sv.event_type, record, sv.version)
    serde.decode(message)  # the event alone is fine
    with pytest.raises(DecodeError, match=r"byte\(s\) after the end of its record"):
        serde.decode(message + suffix)


def test_both_paths_say_the_same() -> None:
    """The same refusals and messages whichever path met the value first."""
    for bad in ({"i": 2**40}, {"ints": [1, 2.5]}, {"f": 1e39}, {"inner": {"n": True}}):
        messages = set()
        for serde in SERDES.values():
            with pytest.raises(EncodeError) as refused:
                serde.encode("numbers", {**BASE, **bad})
            messages.add(str(refused.value))
        assert len(messages) == 1, messages
