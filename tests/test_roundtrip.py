"""Every event type survives encode/decode, and the encoding is the Avro standard one."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import avro.io
import avro.schema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.catalog import SchemaCatalog
from streams.serde import MAGIC, DecodeError, Serde
from tests.avro_strategies import strategy_for

CATALOG = SchemaCatalog.load(Path(__file__).parents[1] / "schemas" / "avro")
VERSIONS = list(CATALOG)


@pytest.mark.parametrize("sv", VERSIONS, ids=lambda sv: f"{sv.event_type}.v{sv.version}")
def test_roundtrip_every_event_type(sv: Any) -> None:
    serde = Serde(CATALOG, reader_versions={sv.event_type: sv.version})

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(strategy_for(sv.raw))
    def roundtrip(record: dict[str, Any]) -> None:
        data = serde.encode(sv.event_type, record, version=sv.version)
        assert serde.decode(data) == (sv.event_type, record)

    roundtrip()


@pytest.mark.parametrize("sv", VERSIONS, ids=lambda sv: f"{sv.event_type}.v{sv.version}")
def test_apache_avro_decodes_headwater_encoding(sv: Any) -> None:
    """Header: C3 01 + Apache avro's own CRC-64-AVRO fingerprint; body: what its DatumReader reads."""
    serde = Serde(CATALOG)
    reference = avro.schema.parse(json.dumps(sv.raw))
    reader = avro.io.DatumReader(reference)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(strategy_for(sv.raw))
    def interop(record: dict[str, Any]) -> None:
        data = serde.encode(sv.event_type, record, version=sv.version)
        assert data[:2] == MAGIC
        assert data[2:10] == reference.fingerprint("CRC-64-AVRO")
        decoded = reader.read(avro.io.BinaryDecoder(io.BytesIO(data[10:])))
        assert decoded == record

    interop()


_KNOWN_HEADERS = [MAGIC + sv.fingerprint for sv in VERSIONS]


@given(st.one_of(st.binary(max_size=64), st.tuples(st.sampled_from(_KNOWN_HEADERS), st.binary(max_size=64))))
@settings(max_examples=300, deadline=None)
def test_garbage_never_crashes_the_decoder(garbage: bytes | tuple[bytes, bytes]) -> None:
    """Random bytes, and random bodies behind a valid header, raise DecodeError and nothing else."""
    data = garbage if isinstance(garbage, bytes) else garbage[0] + garbage[1]
    serde = Serde(CATALOG)
    # DecodeError is the only error a consumer has to expect; anything else fails the test.
    with contextlib.suppress(DecodeError):
        serde.decode(data)
