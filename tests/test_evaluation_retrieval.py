import numpy as np
import pandas as pd
import pytest

from morphoprof.errors import InputError
from morphoprof.evaluation.retrieval import (
    activity_map,
    average_precision,
    consistency_map,
    nn_accuracy,
)


def test_average_precision_by_hand():
    # query 0 ranks its partners by cosine: 1 (pos, sim 1), 3 (neg), 2 (pos), 4 (neg)
    x = np.array([[1, 0], [1, 0], [0.2, 1], [1, 0.5], [-1, 0]], float)
    pos = np.zeros((5, 5), bool)
    neg = np.zeros((5, 5), bool)
    pos[0, [1, 2]] = True
    neg[0, [3, 4]] = True
    ap = average_precision(x, pos, neg)
    assert ap["row"].tolist() == [0]
    # precision at the positives' ranks 1 and 3: (1/1 + 2/3) / 2
    assert ap["average_precision"].iloc[0] == pytest.approx((1 + 2 / 3) / 2)
    assert (ap["n_pos_pairs"].iloc[0], ap["n_total_pairs"].iloc[0]) == (2, 4)


def _wells(seed=0, n_treat=6, reps=4, n_ctrl=12, strength=0.8):
    rng = np.random.default_rng(seed)
    meta, x = [], []
    for t in range(n_treat):
        centre = rng.normal(size=10) * strength * (t % 3)  # every third treatment is inactive
        for _ in range(reps):
            meta.append({"Metadata_compound": f"c{t}", "Metadata_concentration": 1.0,
                         "Metadata_moa": f"m{t % 2}", "Metadata_control": False})
            x.append(centre + rng.normal(size=10))
    for _ in range(n_ctrl):
        meta.append({"Metadata_compound": "DMSO", "Metadata_concentration": 0.0,
                     "Metadata_moa": "", "Metadata_control": True})
        x.append(rng.normal(size=10))
    meta = pd.DataFrame(meta)
    x = np.array(x)
    return meta, x, pd.concat([meta, pd.DataFrame(x, columns=[f"f{i}" for i in range(10)])],
                              axis=1)


def test_activity_map_agrees_with_copairs():
    import copairs.map as cm

    meta, x, df = _wells()
    table, summary = activity_map(df, null_size=2000)
    # copairs' own recipe for "activity against controls": a reference index that is unique for
    # each control and -1 for every treated well
    m = meta.assign(ref=np.where(meta.Metadata_control, np.arange(len(meta)), -1))
    want = cm.average_precision(m, x, pos_sameby=["Metadata_compound", "ref"], pos_diffby=[],
                                neg_sameby=[], neg_diffby=["Metadata_compound", "ref"],
                                progress_bar=False)
    want = want[~meta.Metadata_control.to_numpy()]
    want_map = want.groupby("Metadata_compound")["average_precision"].mean()
    got = table.set_index("Metadata_compound")["mean_average_precision"]
    np.testing.assert_allclose(got.loc[want_map.index], want_map, rtol=1e-9)
    assert summary["n_groups"] == 6 and summary["n_queries"] == 24
    # the strongest treatments are retrieved better than the inactive ones (t % 3 == 0)
    assert got[["c2", "c5"]].min() > got[["c0", "c3"]].max()
    active = table.set_index("Metadata_compound")["below_p"]
    assert active[["c2", "c5"]].all() and not active[["c0", "c3"]].any()
    assert 0 <= summary["fraction_retrieved"] <= 1


def test_consistency_map_agrees_with_copairs():
    import copairs.map as cm

    _, _, wells = _wells(seed=1, reps=1, n_ctrl=0)
    table, summary = consistency_map(wells, null_size=1000)
    meta = wells[["Metadata_compound", "Metadata_moa"]]
    x = wells[[f"f{i}" for i in range(10)]].to_numpy()
    want = cm.average_precision(meta, x, pos_sameby=["Metadata_moa"],
                                pos_diffby=["Metadata_compound"], neg_sameby=[],
                                neg_diffby=["Metadata_moa"], progress_bar=False)
    want_map = want.groupby("Metadata_moa")["average_precision"].mean()
    got = table.set_index("Metadata_moa")["mean_average_precision"]
    np.testing.assert_allclose(got.loc[want_map.index], want_map, rtol=1e-9)
    with pytest.raises(InputError, match="at least 3"):
        consistency_map(wells.iloc[:2])


def test_activity_map_needs_controls_and_finite_features():
    _, _, df = _wells()
    with pytest.raises(InputError, match="needs control wells"):
        activity_map(df[~df.Metadata_control])
    bad = df.copy()
    bad.loc[2, "f3"] = np.nan
    with pytest.raises(InputError, match=r"NaN or infinite features \(rows \[2\]\)"):
        activity_map(bad)


def test_nn_accuracy_replicate_and_group():
    df = pd.DataFrame({"Metadata_compound": ["a", "a", "b", "b", "c"],
                       "Metadata_family": ["F", "F", "F", "F", "G"],
                       "f1": [1.0, 0.95, 0.9, 0.0, -1.0], "f2": [0.0, 0.1, 0.3, 1.0, 0.0]})
    rep = nn_accuracy(df, "Metadata_compound")
    # nearest neighbours: a1->a2, a2->a1, b1->a2 (wrong), b2->b1, c->b2 (wrong)
    assert (rep["correct"], rep["n"]) == (3, 5)
    fam = nn_accuracy(df, "Metadata_family", exclude_same=["Metadata_compound"])
    # excluding same-compound neighbours, a's match b (F) and b's match a (F); c matches an F
    assert (fam["correct"], fam["n"]) == (4, 5)
