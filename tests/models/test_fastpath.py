"""models.fastpath: every scorer equals scikit-learn's predict_proba / predict, bit for bit,
at every batch size (compiled rows for few rows, scikit-learn's tree walk or the trees
compiled to machine code for many)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from models import fastpath
from models.fastpath import compile_scorer, reference_scores

SIZES = [1, 2, 7, 30, 31, 60, 61, 200, 2_000]  # both sides of the crossover (half the tree count)


def data(seed: int, n: int = 3_000, width: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, width)) * 10
    x[rng.random(x.shape) < 0.05] = np.nan  # trained with missing values: nodes learn a direction
    signal = np.nan_to_num(x[:, 0]) + np.nan_to_num(x[:, 3]) * 0.5 + rng.normal(0, 5, n)
    return x, (signal > 0).astype(int), signal


def probes(seed: int, width: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed + 100)
    x = rng.normal(size=(2_000, width)) * 12
    x[rng.random(x.shape) < 0.1] = np.nan
    x[:3] = np.inf
    x[3:6] = -np.inf
    x[6, :] = 0.0
    return x


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_boosting_scores_equal_scikit_learn_at_every_size(seed: int) -> None:
    x, y, target = data(seed)
    models = [
        (
            HistGradientBoostingClassifier(max_iter=60, random_state=seed, early_stopping=False).fit(x, y),
            "classification",
        ),
        (
            HistGradientBoostingRegressor(max_iter=60, random_state=seed, early_stopping=False).fit(
                x, target
            ),
            "regression",
        ),
    ]
    test = probes(seed)
    for model, task in models:
        scorer = compile_scorer(model, task)
        expected = reference_scores(model, task, test)
        for n in SIZES:
            assert scorer(test[:n]).tolist() == expected[:n].tolist(), (task, n)
        assert [scorer.one(row) for row in test[:300].tolist()] == expected[:300].tolist()


def test_both_tree_paths_are_taken_and_agree() -> None:
    x, y, _ = data(3)
    model = HistGradientBoostingClassifier(max_iter=40, random_state=0, early_stopping=False).fit(x, y)
    scorer = compile_scorer(model, "classification")
    assert isinstance(scorer, fastpath._Trees)
    test = probes(3)[:100]
    compiled = scorer._rows()
    assert compiled is not None
    walked = scorer._raw_walk(test)
    rows = np.array([compiled(row) for row in test.tolist()])
    assert walked.tolist() == rows.tolist()
    assert walked.tolist() == model._raw_predict(test)[:, 0].tolist()


def test_trees_compiled_to_machine_code_equal_scikit_learn_and_are_cached(tmp_path: Path) -> None:
    x, y, target = data(6)
    models = [
        (
            HistGradientBoostingClassifier(max_iter=50, random_state=1, early_stopping=False).fit(x, y),
            "classification",
        ),
        (HistGradientBoostingRegressor(max_iter=30, random_state=1).fit(x, target), "regression"),
    ]
    test = probes(6)
    for model, task in models:
        scorer = compile_scorer(model, task, native_dir=tmp_path)
        assert isinstance(scorer, fastpath._Trees)
        assert scorer._native is not None, "tl2cgen/gcc did not build the trees (see the log)"
        expected = reference_scores(model, task, test)
        for n in SIZES:
            assert scorer(test[:n]).tolist() == expected[:n].tolist(), (task, n)
    libraries = sorted(tmp_path.glob("trees-*.so"))
    assert len(libraries) == 2 and not list(tmp_path.glob("*.tmp.so"))
    built = [p.stat().st_mtime_ns for p in libraries]
    again = compile_scorer(models[0][0], "classification", native_dir=tmp_path)  # loads, no gcc
    assert again._native is not None  # type: ignore[attr-defined]
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.glob("trees-*.so"))] == built
    assert again(test).tolist() == reference_scores(models[0][0], "classification", test).tolist()


def test_a_cached_library_that_holds_other_trees_is_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x, y, _ = data(8)
    first = HistGradientBoostingClassifier(max_iter=20, random_state=0, early_stopping=False).fit(x, y)
    second = HistGradientBoostingClassifier(max_iter=20, random_state=1, early_stopping=False).fit(
        x[::2], y[::2]
    )
    compile_scorer(first, "classification", native_dir=tmp_path / "a")
    compile_scorer(second, "classification", native_dir=tmp_path / "b")
    (library,) = (tmp_path / "a").glob("trees-*.so")
    (other,) = (tmp_path / "b").glob("trees-*.so")
    (tmp_path / "c").mkdir()  # a path not loaded yet (the loader reuses a loaded path's library)
    (tmp_path / "c" / library.name).write_bytes(other.read_bytes())  # the first's name, the second's trees
    scorer = compile_scorer(first, "classification", native_dir=tmp_path / "c")
    assert scorer._native is None  # type: ignore[attr-defined]
    assert "scores differently" in caplog.text
    test = probes(8)[:200]
    assert scorer(test).tolist() == reference_scores(first, "classification", test).tolist()


def test_trees_fall_back_to_the_walk_when_they_cannot_be_compiled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x, y, _ = data(7)
    model = HistGradientBoostingClassifier(max_iter=10, random_state=0, early_stopping=False).fit(x, y)
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    scorer = compile_scorer(model, "classification", native_dir=blocked)
    assert scorer._native is None  # type: ignore[attr-defined]
    assert "trees_not_compiled" in caplog.text
    test = probes(7)[:200]
    assert scorer(test).tolist() == reference_scores(model, "classification", test).tolist()


def test_trees_too_deep_to_compile_are_walked(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, _ = data(4)
    model = HistGradientBoostingClassifier(max_iter=20, random_state=0, early_stopping=False).fit(x, y)
    monkeypatch.setattr(fastpath, "_MAX_COMPILED_DEPTH", 1)
    scorer = compile_scorer(model, "classification")
    test = probes(4)[:20]
    assert scorer._rows() is None  # type: ignore[attr-defined]
    assert scorer(test).tolist() == reference_scores(model, "classification", test).tolist()
    assert scorer.one(test[0].tolist()) == reference_scores(model, "classification", test[:1])[0]


def test_what_is_not_compiled_falls_back_to_the_estimator() -> None:
    x, y, _ = data(5)
    x = np.nan_to_num(x)
    multiclass = HistGradientBoostingClassifier(max_iter=10, random_state=0).fit(x, y + (x[:, 1] > 5))
    categorical = HistGradientBoostingClassifier(max_iter=10, categorical_features=[2], random_state=0).fit(
        np.column_stack([x[:, :2], (np.abs(x[:, 2]) % 5).astype(int), x[:, 3:]]), y
    )
    for model in (multiclass, categorical):
        scorer = compile_scorer(model, "classification")
        assert not isinstance(scorer, fastpath._Trees)
        test = np.column_stack([x[:50, :2], (np.abs(x[:50, 2]) % 5).astype(int), x[:50, 3:]])
        assert scorer(test).tolist() == reference_scores(model, "classification", test).tolist()
    small = HistGradientBoostingClassifier(max_iter=5, random_state=0).fit(x, y)
    ints = np.rint(x[:10]).astype(np.int64)  # not float64: the estimator converts it
    assert compile_scorer(small, "classification")(ints).tolist() == (
        reference_scores(small, "classification", ints).tolist()
    )


def test_linear_models_equal_scikit_learn_to_rounding() -> None:
    # Same operations, but BLAS may order a dot product's sums differently (as in test_estimators).
    x, y, target = data(6)
    x = np.nan_to_num(x)
    cases = [
        (make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y), "classification"),
        (LogisticRegression().fit(x, y), "classification"),
        (make_pipeline(StandardScaler(), LinearRegression()).fit(x, target), "regression"),
    ]
    for model, task in cases:
        scorer = compile_scorer(model, task)
        expected = reference_scores(model, task, x[:100])
        np.testing.assert_allclose(scorer(x[:100]), expected, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(scorer.one(x[0].tolist()), expected[0], rtol=1e-12, atol=1e-15)
