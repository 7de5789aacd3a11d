"""The compiled Avro fast path is byte-identical to fastavro, and the serde's results do not change.

Encoders: for every schema in the catalog, generated records encode to exactly fastavro's bytes
(and take the fast path, not the fallback); for synthetic schemas and loosely typed values, the
compiled code either falls back or writes fastavro's bytes. Decoders: valid bodies decode to
fastavro's records; fuzzed and mutated bodies either fall back or decode to exactly what fastavro
reads from them. Plus the consumer's and producer's hot-path helpers against what they replace.
"""

from __future__ import annotations

import math
import struct
import uuid
from io import BytesIO
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.catalog import SchemaCatalog, SchemaVersion
from streams.consumer import Event, _event, _headers
from streams.fastpath import compile_decoder, compile_encoder
from streams.producer import _trace_id
from streams.serde import DecodeError, EncodeError, Serde
from tests.avro_strategies import strategy_for
from tests.conftest import SCHEMAS

CATALOG = SchemaCatalog.load(SCHEMAS)
VERSIONS = list(CATALOG)
IDS = [f"{sv.event_type}.v{sv.version}" for sv in VERSIONS]
FAST = Serde(CATALOG)
SLOW = Serde(CATALOG, fast_path=False)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fastavro_bytes(parsed: Any, record: Any) -> bytes:
    buf = BytesIO()
    schemaless_writer(buf, parsed, record)
    return buf.getvalue()


def fastavro_read(parsed: Any, body: bytes) -> Any:
    return schemaless_reader(BytesIO(body), parsed, None)


def canon(value: Any) -> Any:
    """A comparable form that tells -0.0 from 0.0, equates NaNs bit for bit and keeps key order."""
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, dict):
        return ("dict", [(k, canon(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [canon(v) for v in value])
    if isinstance(value, tuple):  # a decoded union branch: (name, value)
        return ("tuple", [canon(v) for v in value])
    return (type(value).__name__, value)


def test_every_catalog_schema_compiles() -> None:
    for sv in VERSIONS:
        assert compile_encoder(sv.parsed) is not None, sv.event_type
        assert compile_decoder(sv.parsed) is not None, sv.event_type


@pytest.mark.parametrize("sv", VERSIONS, ids=IDS)
@SETTINGS
@given(data=st.data())
def test_encoder_is_byte_identical_to_fastavro(sv: SchemaVersion, data: st.DataObject) -> None:
    record = data.draw(strategy_for(sv.raw))
    encode = compile_encoder(sv.parsed)
    assert encode is not None
    expected = fastavro_bytes(sv.parsed, record)
    assert encode(record) == expected  # the fast path itself, no fallback
    assert FAST.encode(sv.event_type, record, sv.version) == SLOW.encode(sv.event_type, record, sv.version)


@pytest.mark.parametrize("sv", VERSIONS, ids=IDS)
@SETTINGS
@given(data=st.data())
def test_missing_fields_take_their_defaults_as_fastavro_writes_them(
    sv: SchemaVersion, data: st.DataObject
) -> None:
    """The serde fills missing top-level fields with their defaults: the bytes fastavro writes."""
    record = data.draw(strategy_for(sv.raw))
    defaulted = [f["name"] for f in sv.raw["fields"] if "default" in f]
    dropped = data.draw(st.lists(st.sampled_from(defaulted), unique=True) if defaulted else st.just([]))
    partial = {k: v for k, v in record.items() if k not in dropped}
    expected = b"\xc3\x01" + sv.fingerprint + fastavro_bytes(sv.parsed, partial)
    assert FAST.encode(sv.event_type, partial, sv.version) == expected
    assert SLOW.encode(sv.event_type, partial, sv.version) == expected
    assert partial == {k: v for k, v in record.items() if k not in dropped}  # the caller's record untouched


@pytest.mark.parametrize("sv", VERSIONS, ids=IDS)
@SETTINGS
@given(data=st.data())
def test_decoder_reads_what_fastavro_reads(sv: SchemaVersion, data: st.DataObject) -> None:
    record = data.draw(strategy_for(sv.raw))
    body = fastavro_bytes(sv.parsed, record)
    decode = compile_decoder(sv.parsed)
    assert decode is not None
    assert canon(decode(body, 0)) == canon(fastavro_read(sv.parsed, body))
    message = FAST.encode(sv.event_type, record, sv.version)
    if sv is CATALOG.latest(sv.event_type):  # read as itself: the compiled decoder's case
        assert canon(decode(message, 10)) == canon(SLOW.decode(message)[1])
    assert canon(FAST.decode(message)) == canon(SLOW.decode(message))


def _same_outcome_as_fastavro(parsed: Any, body: bytes) -> None:
    """The compiled decoder falls back (raises) or returns exactly what fastavro reads."""
    decode = compile_decoder(parsed)
    assert decode is not None
    try:
        fast = decode(body, 0)
    except Exception:
        return  # the serde then asks fastavro, whatever it says
    assert canon(fast) == canon(fastavro_read(parsed, body))


def _mutations(sv: SchemaVersion) -> st.SearchStrategy[bytes]:
    """Valid bodies of ``sv`` with bytes flipped, cut off or inserted: corrupt input of every kind."""

    def mutate(body: bytes, edits: list[tuple[int, int, int]]) -> bytes:
        out = bytearray(body)
        for kind, position, byte in edits:
            at = position % (len(out) + 1)
            if kind == 0 and out:
                out[at % len(out)] = byte
            elif kind == 1:
                out.insert(at, byte)
            else:
                del out[at:]
        return bytes(out)

    bodies = strategy_for(sv.raw).map(lambda r: fastavro_bytes(sv.parsed, r))
    edit = st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255))
    return st.builds(mutate, bodies, st.lists(edit, min_size=1, max_size=4))


HOT = [CATALOG.latest("click"), CATALOG.latest("feature_update"), CATALOG.get("click", 1)]


@pytest.mark.parametrize("sv", HOT, ids=lambda sv: f"{sv.event_type}.v{sv.version}")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_bodies_decode_as_fastavro_or_fall_back(sv: SchemaVersion, data: st.DataObject) -> None:
    body = data.draw(st.one_of(_mutations(sv), st.binary(max_size=80)))
    _same_outcome_as_fastavro(sv.parsed, body)
    message = b"\xc3\x01" + sv.fingerprint + body
    try:
        expected: Any = SLOW.decode(message)
    except DecodeError:
        with pytest.raises(DecodeError):
            FAST.decode(message)
        return
    assert canon(FAST.decode(message)) == canon(expected)


# Unions where fastavro chooses a branch by type and range, and every other shape the compiler
# generates code for, with loosely typed values: the fast path writes fastavro's bytes or falls back.
UNIONS: list[Any] = [
    ["null", "double", "long"],
    ["null", "long", "double"],
    ["null", "int", "long"],
    ["float", "double"],
    ["double", "float"],
    ["null", "boolean", "long", "double", "string"],
    ["null", "long", "boolean"],
    ["string", "bytes"],
    ["bytes", "string", "null"],
    ["int"],
]
SYNTHETIC = parse_schema({
    "type": "record", "name": "test.Synthetic", "fields": [
        *({"name": f"u{i}", "type": u} for i, u in enumerate(UNIONS)),
        {"name": "e", "type": {"type": "enum", "name": "test.E", "symbols": ["A", "B", "C"]}},
        {"name": "e2", "type": "test.E"},
        {"name": "fx", "type": {"type": "fixed", "name": "test.F", "size": 3}},
        {"name": "f32", "type": "float"},
        {"name": "arr", "type": {"type": "array", "items": {"type": "map", "values": "long"}}},
        {"name": "nested", "type": {"type": "record", "name": "test.N", "fields": [
            {"name": "b", "type": "boolean"}, {"name": "by", "type": "bytes"},
            {"name": "i", "type": "int"}]}},
    ],
})  # fmt: skip
LOOSE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1, 2**63, -(2**63)]),
    st.floats(),
    st.floats(width=32),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.sampled_from(["A", "B", "C", "D"]),
)


def synthetic_records() -> st.SearchStrategy[dict[str, Any]]:
    plain = {
        "e": st.sampled_from(["A", "B", "C"]),
        "e2": st.sampled_from(["A", "C"]),
        "fx": st.binary(min_size=3, max_size=3),
        "f32": st.floats(width=32),
        "arr": st.lists(st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), max_size=3)),
        "nested": st.fixed_dictionaries(
            {"b": st.booleans(), "by": st.binary(max_size=4), "i": st.integers(-(2**31), 2**31 - 1)}
        ),
    }
    loose = {f"u{i}": LOOSE for i in range(len(UNIONS))}
    for name, strategy in plain.items():  # now and then a wrong type for the plain fields too
        loose[name] = st.one_of(strategy, strategy, LOOSE)
    return st.fixed_dictionaries(loose)


ENUM = {"type": "enum", "name": "E", "symbols": ["A", "B"]}
# Bodies where fastavro's reading is lenient or odd (a boolean byte of 2 is True, a negative enum
# index wraps around, a varint past 64 bits is truncated): the fast path must not differ.
EDGE_CASES: list[tuple[Any, bytes]] = [
    ("boolean", b"\x02"),
    ("boolean", b"\xff"),
    ("long", b"\xff" * 10 + b"\x01"),  # 11 bytes
    ("long", b"\xfe" + b"\xff" * 8 + b"\x01"),  # 10 bytes, the largest long
    ("long", b"\xfe" + b"\xff" * 8 + b"\x7f"),  # 10 bytes, past 64 bits
    ("long", b"\xfe" + b"\xff" * 8 + b"\x03"),  # 10 bytes, bits 64 and 65
    ("long", b"\x80" * 10 + b"\x00"),  # a zero written in 11 bytes
    ("long", b"\x80\x00"),  # a zero written in two bytes
    ("int", b"\xfe\xff\xff\xff\x1f"),  # beyond the int range
    ("string", b"\x01abc"),  # negative length
    ("string", b"\x80\x01" + b"a" * 64),  # a two-byte length
    ("bytes", b"\x06ab"),  # shorter than its length
    ("string", b"\x04\xff\xfe"),  # not UTF-8
    (ENUM, b"\x01"),  # index -1
    (ENUM, b"\x04"),  # index 2 of 2
    (["null", "long"], b"\x04"),  # branch 2 of 2
    (["null", "long"], b"\x01\x02"),  # branch -1
    ({"type": "map", "values": "long"}, b"\x01\x06\x02a\x04\x00"),  # a sized (negative count) block
    ({"type": "array", "items": "long"}, b"\x03\x04\x02\x04\x00"),
    ({"type": "array", "items": "long"}, b"\x04\x02"),  # truncated
    ("double", b"\x00\x00\x00\x00\x00\x00\xf8\x7f"),  # NaN
    ("float", b"\x00\x00\x80"),  # truncated
]


@pytest.mark.parametrize(("schema", "body"), EDGE_CASES)
def test_odd_bodies_decode_as_fastavro_or_fall_back(schema: Any, body: bytes) -> None:
    parsed = parse_schema({"type": "record", "name": "Edge", "fields": [{"name": "v", "type": schema}]})
    _same_outcome_as_fastavro(parsed, body)
    decode = compile_decoder(parsed)
    assert decode is not None
    try:
        fast = decode(body, 0)
    except Exception:
        return
    assert canon(fast) == canon(fastavro_read(parsed, body))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=synthetic_records())
def test_loose_values_encode_as_fastavro_or_fall_back(record: dict[str, Any]) -> None:
    encode = compile_encoder(SYNTHETIC)
    assert encode is not None
    try:
        fast = encode(record)
    except Exception:
        return  # fastavro decides: the serde calls it with the same record
    assert fast == fastavro_bytes(SYNTHETIC, record)
    decode = compile_decoder(SYNTHETIC)
    assert decode is not None
    assert canon(decode(fast, 0)) == canon(fastavro_read(SYNTHETIC, fast))


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=120))
def test_synthetic_fuzz_decodes_as_fastavro_or_falls_back(body: bytes) -> None:
    _same_outcome_as_fastavro(SYNTHETIC, body)


def test_plain_values_take_the_fast_path_for_every_union_branch() -> None:
    encode = compile_encoder(SYNTHETIC)
    assert encode is not None
    base: dict[str, Any] = {
        "e": "B", "e2": "C", "fx": b"abc", "f32": 1.5, "arr": [{"a": 1}, {}],
        "nested": {"b": True, "by": b"\x00", "i": -7},
    }  # fmt: skip
    for value in (None, True, 5, 2**40, -(2**63), 2.5, -0.0, math.inf, "é", b"\xff"):
        record = {**base, **{f"u{i}": value for i in range(len(UNIONS))}}
        for i, union in enumerate(UNIONS):  # a value a union cannot hold gets one it can
            try:
                fastavro_bytes(parse_schema({"type": "record", "name": "P", "fields": [
                    {"name": "v", "type": union}]}), {"v": value})  # fmt: skip
            except Exception:
                record[f"u{i}"] = None if "null" in union else ("x" if "string" in union else 1)
        assert encode(record) == fastavro_bytes(SYNTHETIC, record), value


def test_errors_are_unchanged() -> None:
    bad = {"event_id": "e1", "event_time": "not a long"}
    with pytest.raises(EncodeError) as fast_error:
        FAST.encode("click", bad)
    with pytest.raises(EncodeError) as slow_error:
        SLOW.encode("click", bad)
    assert str(fast_error.value) == str(slow_error.value)
    good = FAST.encode("click", {
        "event_id": "e1", "event_time": 1, "user_id": "u", "item_id": "i", "action": "CLICK",
        "position": 1, "campaign": "all", "propensity": None, "session_id": None, "user_features": {},
    })  # fmt: skip
    for cut in (11, 14, len(good) - 1):
        with pytest.raises(DecodeError) as fast_decode:
            FAST.decode(good[:cut])
        with pytest.raises(DecodeError) as slow_decode:
            SLOW.decode(good[:cut])
        assert str(fast_decode.value) == str(slow_decode.value)


# --- the consumer's and producer's hot-path helpers ----------------------------------------------


def test_fast_event_equals_the_dataclass() -> None:
    args: tuple[Any, ...] = ("clicks", 2, 41, b"k", "click", {"a": 1}, {"h": b"v"}, 1700, b"raw", False)
    fast, slow = _event(*args), Event(*args)
    assert fast == slow and repr(fast) == repr(slow) and hash(fast.topic) == hash(slow.topic)
    with pytest.raises(AttributeError):
        fast.offset = 3  # type: ignore[misc]  # still frozen


class _Msg:
    def __init__(self, headers: Any) -> None:
        self._headers = headers

    def headers(self) -> Any:
        return self._headers


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.one_of(st.none(), st.binary(max_size=3),
                                                                        st.text(max_size=3)))))  # fmt: skip
def test_headers_fast_path_keeps_the_general_rule(pairs: list[tuple[str, Any]]) -> None:
    general = {k: v.encode() if isinstance(v, str) else v for k, v in pairs if v is not None}
    assert _headers(_Msg(pairs)) == general  # type: ignore[arg-type]
    assert _headers(_Msg(None)) == {}  # type: ignore[arg-type]


def test_trace_ids_are_uuid4_hex() -> None:
    ids = {_trace_id() for _ in range(2000)}
    assert len(ids) == 2000
    for trace_id in list(ids)[:200]:
        parsed = uuid.UUID(hex=trace_id)
        assert parsed.hex == trace_id and parsed.version == 4 and parsed.variant == uuid.RFC_4122
