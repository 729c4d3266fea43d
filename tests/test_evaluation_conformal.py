import numpy as np
import pandas as pd
import pytest

from morphoprof.errors import InputError
from morphoprof.evaluation.conformal import (
    conformal_moa,
    conformal_threshold,
    prediction_sets,
    set_metrics,
)


def test_threshold_is_the_finite_sample_quantile():
    scores = np.arange(1, 11) / 10  # 0.1 .. 1.0, n = 10
    # ceil(11 * 0.9) = 10 -> the 10th smallest; ceil(11 * 0.5) = 6 -> the 6th
    assert conformal_threshold(scores, 0.1) == pytest.approx(1.0)
    assert conformal_threshold(scores, 0.5) == pytest.approx(0.6)
    # too few calibration scores for 95% coverage: every label goes into every set
    assert conformal_threshold(scores[:5], 0.05) == np.inf
    sets = prediction_sets(np.array([[0.2, 0.7], [0.65, 0.1]]), 0.6)
    assert sets.tolist() == [[True, False], [False, True]]
    m = set_metrics(np.array([[True, True], [False, True]]), np.array([0, 0]))
    assert m == {"coverage": 0.5, "mean_set_size": 1.5, "singleton_fraction": 0.5, "n": 2}
    with pytest.raises(InputError, match="alpha"):
        conformal_threshold(scores, 1.5)


def _treatments(seed, n_moa=5, cpd_per_moa=6, doses=2, noise=1.2):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_moa, 16))
    rows = []
    for m in range(n_moa):
        for c in range(cpd_per_moa):
            cpd_centre = centres[m] + 0.5 * rng.normal(size=16)
            for d in range(doses):
                f = cpd_centre + noise * rng.normal(size=16)
                rows.append({"Metadata_compound": f"m{m}c{c}", "Metadata_concentration": d,
                             "Metadata_moa": f"M{m}", **{f"f{i}": f[i] for i in range(16)}})
    return pd.DataFrame(rows)


def test_conformal_coverage_on_synthetic_profiles():
    # averaged over screens, leave-one-compound-out sets reach the stated coverage, and smaller
    # alpha buys coverage with larger sets
    cov, size = {0.1: [], 0.3: []}, {0.1: [], 0.3: []}
    for seed in range(8):
        df = _treatments(seed)
        for alpha in cov:
            r = conformal_moa(df, alpha)
            cov[alpha].append(r["coverage"])
            size[alpha].append(r["mean_set_size"])
    for alpha in cov:
        assert np.mean(cov[alpha]) >= 1 - alpha - 0.05, (alpha, np.mean(cov[alpha]))
    assert np.mean(size[0.1]) > np.mean(size[0.3]) >= 1.0
    assert np.mean(size[0.3]) < 5  # informative: fewer than all 5 MoAs on average
    r = conformal_moa(_treatments(0), 0.1)
    assert set(r["per_moa"]) == {f"M{m}" for m in range(5)} and r["n"] == 60
    covered = np.mean([s["moa"] in s["set"] for s in r["sets"]])
    assert covered == pytest.approx(r["coverage"])


def test_single_compound_moa_is_left_out_and_named():
    df = _treatments(1, n_moa=3, cpd_per_moa=3)
    df.loc[df.Metadata_moa == "M2", "Metadata_compound"] = "only"
    r = conformal_moa(df, 0.2)
    assert r["labels"] == ["M0", "M1"] and "['M2'] have a single compound" in r["warnings"][0]
    with pytest.raises(InputError, match=">= 2 MoAs"):
        conformal_moa(df[df.Metadata_moa != "M1"], 0.2)
