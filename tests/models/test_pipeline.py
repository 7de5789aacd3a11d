"""The pipeline's pre and post stages, and the same x from a training frame and a serving row."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from features.repository import FeatureRepository
from headwater.errors import HeadwaterError
from headwater.sdk import FeatureStore
from headwater.settings import Settings
from models.pipeline import ModelPipeline, rank_frame, rank_items, records
from models.spec import ModelSpec, stored_reads
from models.training import training_frame


@pytest.fixture(scope="module")
def ctr(
    example_specs: dict[str, ModelSpec], repository: FeatureRepository, frame: pd.DataFrame
) -> ModelPipeline:
    spec = example_specs["ctr_model"].model_copy(update={"params": {"max_iter": 30, "max_depth": 3}})
    return ModelPipeline(spec, repository).fit(frame)


def test_a_serving_row_and_a_training_row_assemble_to_the_same_vector(
    lake: Settings, ctr: ModelPipeline, clicks: list[dict[str, Any]], repository: FeatureRepository
) -> None:
    now = clicks[-1]["event_time"]
    last_day = [c for c in clicks if c["event_time"] > now - 3_600_000 and c["action"] == "IMPRESSION"]
    entities = [
        {"user_id": c["user_id"], "item_id": c["item_id"], "position": c["position"]} for c in last_day
    ]
    entities = entities[:25]
    # Training: point-in-time values at `now` from the offline store (the SDK, as training_frame does).
    labels = pd.DataFrame([{**e, "label_time": now, "clicked": 0} for e in entities])
    offline = training_frame(lake, ctr.spec, labels, bitemporal=False)
    # Serving: the online store's latest values (the same events, backfilled) plus the request.
    stored = [f"{fs}:{n}" for fs, names in stored_reads(ctr.spec, repository).items() for n in names]
    with FeatureStore(lake, repository) as store:
        online = store.get_online_features(stored, entities, now_ms=now)
    serving_rows = [{**e, **row} for e, row in zip(entities, online.rows, strict=True)]
    x_train, missing_train = ctr.assemble(records(offline))
    x_serve, missing_serve = ctr.assemble(serving_rows)
    assert np.array_equal(x_train, x_serve)
    assert missing_train == missing_serve
    assert np.array_equal(ctr.scores(x_train), ctr.scores(x_serve))


def test_a_whole_frame_assembles_column_wise_to_the_row_by_row_matrix(
    ctr: ModelPipeline, frame: pd.DataFrame
) -> None:
    holes = frame.copy()
    holes.loc[holes.index[::7], "user_activity:clicks_7d"] = np.nan  # some missing stored values
    holes.loc[holes.index[::5], "position"] = None  # and missing request fields
    x_rows, missing_rows = ctr.assemble(records(holes))
    x_frame, mask = ctr.assemble_frame(holes)
    assert np.array_equal(x_rows, x_frame)
    as_names = [{c for c, m in zip(ctr.columns, row, strict=True) if m} for row in mask.tolist()]
    assert as_names == [{n for n in names if n in ctr.columns} for names in missing_rows]
    assert mask.any()
    with pytest.raises(HeadwaterError, match="features must be numbers"):
        ctr.assemble_frame(holes.assign(position="top"))


def test_missing_values_fall_back_to_defaults_and_are_reported(ctr: ModelPipeline) -> None:
    x, missing = ctr.assemble([{"user_id": "new", "item_id": "1", "position": 3}])
    row = dict(zip(ctr.columns, x[0].tolist(), strict=True))
    assert row["user_activity:best_clicked_position_7d"] == 4.0  # the spec's default
    assert row["user_activity:clicks_7d"] == 0.0  # the documented rule: no stored value is 0
    assert row["position"] == 3.0
    # The on-demand CTR has its own rule for missing inputs (the prior), and is not defaulted.
    assert row["item_ctr:ctr_at_position"] > 0 and "item_ctr:ctr_at_position" not in missing[0]
    assert "item_activity:clicks_24h" in missing[0] and "user_activity:clicks_7d" in missing[0]
    assert "position" not in missing[0]
    x2, missing2 = ctr.assemble([{"user_id": "new", "item_id": "1", "user_activity:clicks_7d": float("nan")}])
    assert x2[0, ctr.columns.index("position")] == 2.0 and "position" in missing2[0]
    with pytest.raises(HeadwaterError, match="features must be numbers"):
        ctr.assemble([{"user_id": "u", "item_id": "1", "position": "top"}])


def test_rank_orders_each_users_items_by_score(ctr: ModelPipeline, frame: pd.DataFrame) -> None:
    items = sorted(frame["item_id"].unique(), key=int)[:15]
    base = records(frame.iloc[[0]])[0]
    rows = [{**base, "user_id": user, "item_id": item, "item_activity:impressions_24h": 50 * k,
             "item_activity:clicks_24h": k % 4, "position": 1 + k % 3}
            for user in ("u1", "u2") for k, item in enumerate(items)]  # fmt: skip
    rows = [r if r["user_id"] == "u1" else {**r, "user_activity:impressions_24h": 40} for r in rows]
    scores = ctr.scores(ctr.assemble(rows)[0])
    ranked = ctr.rank(rows)
    assert set(ranked) == {"u1", "u2"}
    for user in ("u1", "u2"):
        mine = [(s, r["item_id"]) for s, r in zip(scores, rows, strict=True) if r["user_id"] == user]
        want = [item for _, item in sorted(mine, key=lambda si: (-si[0], si[1]))][:10]
        assert ranked[user] == want and len(want) == 10
    assert ctr.rank(rows, top_k=3)["u1"] == ranked["u1"][:3]
    predictions = ctr.predict(rows)
    assert predictions[0].ranked_items == ranked["u1"] and predictions[-1].ranked_items == ranked["u2"]
    assert predictions[0].score == pytest.approx(scores[0]) and predictions[0].label in {"0", "1"}


def test_the_vectorised_ranking_equals_the_serving_one() -> None:
    rng = np.random.default_rng(3)
    n = 5_000
    groups = rng.integers(0, 40, n).astype(str)
    items = rng.integers(0, 300, n).astype(str)
    scores = rng.integers(0, 20, n) / 20.0  # many ties: they break on the item id
    rows = [{"user_id": g, "item_id": i} for g, i in zip(groups, items, strict=True)]
    want = rank_items(rows, scores, group_key="user_id", rank_key="item_id", top_k=7)
    got = rank_frame(groups, items, scores, top_k=7)
    assert dict(zip(got["group"], got["ranked_items"], strict=True)) == want
    best = {g: max(s for gg, s in zip(groups, scores, strict=True) if gg == g) for g in want}
    assert dict(zip(got["group"], got["score"], strict=True)) == best


def test_a_single_row_scores_as_the_estimator_does(ctr: ModelPipeline, frame: pd.DataFrame) -> None:
    # The single-row path (serving) takes the compiled fast path; its speed is measured by
    # benchmarks/serving.py, its result must be the estimator's own.
    row = records(frame.iloc[[100]])[0]
    x, _ = ctr.assemble([row])
    assert ctr.scores(x)[0] == ctr.estimator.predict_proba(x)[0, 1]  # type: ignore[union-attr]
