"""Schema catalog and single-object serde, without Kafka."""

from __future__ import annotations

import copy

import pytest

from streams.catalog import SchemaCatalog
from streams.compat import check_catalog, check_pair
from streams.serde import DecodeError, Serde

CLICK = {
    "event_id": "e1", "event_time": 1_574_553_634_762, "user_id": "u1", "item_id": "14",
    "action": "CLICK", "position": 3, "campaign": "all", "propensity": 0.0125,
}  # fmt: skip


def test_every_event_type_of_the_design_is_in_the_catalog(catalog: SchemaCatalog) -> None:
    assert set(catalog.event_types) == {
        "click", "outcome", "feature_update", "prediction", "assignment", "prediction_outcome",
        "model_event", "experiment_event", "bandit_state", "alert", "dead_letter",
    }  # fmt: skip


def test_every_field_is_documented(catalog: SchemaCatalog) -> None:
    def walk(schema: object, where: str) -> None:
        if isinstance(schema, dict):
            for f in schema.get("fields", []):
                assert f.get("doc"), f"{where}.{f['name']} has no doc"
                walk(f["type"], f"{where}.{f['name']}")
            for key in ("items", "values"):
                if key in schema:
                    walk(schema[key], where)
        elif isinstance(schema, list):
            for s in schema:
                walk(s, where)

    for sv in catalog:
        walk(sv.raw, f"{sv.event_type}.v{sv.version}")
        names = {f["name"] for f in sv.raw["fields"]}
        assert "event_time" in names, sv.event_type


def test_catalog_history_is_fully_compatible(catalog: SchemaCatalog) -> None:
    assert check_catalog(catalog) == []


def test_new_required_field_is_rejected_for_old_data(catalog: SchemaCatalog) -> None:
    latest = catalog.latest("click")
    raw = copy.deepcopy(latest.raw)
    raw["fields"].append({"name": "score", "type": "double", "doc": "no default"})
    bad = SchemaCatalog.make_version("click", latest.version + 1, raw)
    problem = check_pair(reader=bad, writer=latest)
    assert problem is not None and "score" in str(problem)
    assert check_catalog(SchemaCatalog([*catalog.versions("click"), bad]))


def test_removed_field_without_default_is_rejected_for_old_readers(catalog: SchemaCatalog) -> None:
    latest = catalog.latest("click")
    raw = copy.deepcopy(latest.raw)
    raw["fields"] = [f for f in raw["fields"] if f["name"] != "position"]
    bad = SchemaCatalog.make_version("click", latest.version + 1, raw)
    assert check_pair(reader=latest, writer=bad) is not None


def test_evolution_old_writer_new_reader(catalog: SchemaCatalog, serde: Serde) -> None:
    data = serde.encode("click", CLICK, version=1)
    event_type, record = serde.decode(data)
    assert event_type == "click"
    assert record == {**CLICK, "session_id": None, "user_features": {}}


def test_evolution_new_writer_old_reader(catalog: SchemaCatalog, serde: Serde) -> None:
    old_reader = Serde(catalog, reader_versions={"click": 1})
    data = serde.encode("click", {**CLICK, "session_id": "s", "user_features": {"f0": "x"}})
    _, record = old_reader.decode(data)
    assert record == CLICK


def test_decode_errors_are_clear(serde: Serde) -> None:
    with pytest.raises(DecodeError, match="not Avro single-object"):
        serde.decode(b"garbage!")
    with pytest.raises(DecodeError, match="unknown schema fingerprint"):
        serde.decode(b"\xc3\x01" + b"\x00" * 8 + b"\x02")
    good = serde.encode("click", CLICK)
    with pytest.raises(DecodeError, match="corrupt click"):
        serde.decode(good[:14])
    with pytest.raises(DecodeError, match="expected a outcome event"):
        serde.decode(good, "outcome")
