"""Dead letters always fit the message limit, and say what they cut."""

from __future__ import annotations

import hashlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.dead_letters import MAX_ERROR_CHARS, dead_letter_record, fit, oversized
from streams.kafka import RECORD_OVERHEAD_BYTES
from tests.test_serde_fastpath import FAST


def size_of(record: dict[str, object]) -> int:
    return len(FAST.encode("dead_letter", record))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(
    value_size=st.integers(0, 300_000),
    key_size=st.integers(0, 40_000),
    header_sizes=st.lists(st.integers(0, 20_000), max_size=3),
    budget=st.integers(2_000, 120_000),
    message=st.text(max_size=3000),
)
def test_a_dead_letter_fits_its_budget_and_keeps_a_prefix(
    value_size: int, key_size: int, header_sizes: list[int], budget: int, message: str
) -> None:
    value, key = bytes(range(256)) * (value_size // 256) + b"v" * (value_size % 256), b"k" * key_size
    headers = {f"h{i}": b"h" * n for i, n in enumerate(header_sizes)}
    record = dead_letter_record("clicks", 2, 41, "features-x", ValueError(message), key, value, headers)
    assert len(record["error"]) <= MAX_ERROR_CHARS
    fitted = fit(record, budget, size_of)
    assert size_of(fitted) <= budget
    assert value.startswith(fitted["original_value"]) and key.startswith(fitted["original_key"])
    assert fitted["original_value_size"] == value_size
    assert fitted["original_value_sha256"] == hashlib.sha256(value).hexdigest()
    cut = (
        fitted["original_value"] != value
        or fitted["original_key"] != key
        or fitted["original_headers"] != headers
    )
    assert fitted["truncated"] == cut
    if size_of(record) <= budget:
        assert fitted == record  # nothing cut that fitted
    elif fitted["original_headers"] == headers:  # what is kept is as much as fits, within a few bytes
        assert size_of(fitted) > budget - 64 or fitted["original_value"] == value


def test_oversized_counts_key_value_and_headers_as_librdkafka_does() -> None:
    limit = 1_000_000
    headers = [("event_type", b"click"), ("trace_id", b"0" * 32)]
    fixed = RECORD_OVERHEAD_BYTES + len(b"k") + sum(len(k) + len(v) + 4 for k, v in headers)
    assert oversized(b"k", b"v" * (limit - fixed), headers, limit) is None
    error = oversized(b"k", b"v" * (limit - fixed + 1), headers, limit)
    assert error is not None and f"record of {limit + 1} bytes" in str(error)
    assert oversized(None, None, None, limit) is None
