import numpy as np
import pandas as pd
import pytest

from morphoprof.errors import InputError
from morphoprof.evaluation.moa import evaluate_moa, nearest_neighbor_moa


def _profiles(rows):
    return pd.DataFrame(
        [{"Metadata_compound": c, "Metadata_concentration": k, "Metadata_moa": m,
          "Metadata_batch": b, "f1": x, "f2": y} for c, k, m, b, x, y in rows]
    )


def test_nsc_excludes_same_compound():
    # a1's other dose is its nearest profile, but NSC must skip it and find a2 (same MoA)
    p = _profiles([
        ("a1", 1, "A", "W1", 1.0, 0.0), ("a1", 2, "A", "W1", 1.0, 0.01),
        ("a2", 1, "A", "W2", 0.9, 0.2), ("b1", 1, "B", "W1", 0.0, 1.0),
        ("b2", 1, "B", "W2", 0.1, 1.0),
    ])
    r = nearest_neighbor_moa(p, "nsc")
    assert (r["correct"], r["n"]) == (5, 5) and r["accuracy"] == 1.0
    assert r["confusion"] == {"labels": ["A", "B"], "matrix": [[3, 0], [0, 2]]}


def test_nscb_excludes_same_batch_and_drops_single_batch_moas():
    p = _profiles([
        ("a1", 1, "A", "W1", 1.0, 0.0), ("a2", 1, "A", "W1", 1.0, 0.05),  # A only in W1
        ("b1", 1, "B", "W1", 0.7, 0.7), ("b2", 1, "B", "W2", 0.0, 1.0),
        ("c1", 1, "C", "W2", 0.75, 0.68), ("c2", 1, "C", "W1", 0.9, -0.2),
    ])
    nsc = nearest_neighbor_moa(p, "nsc")
    assert nsc["n"] == 6
    r = nearest_neighbor_moa(p, "nscb")
    assert r["dropped_moas"] == ["A"] and r["n"] == 4
    preds = {x["compound"]: x["predicted"] for x in r["predictions"]}
    # b1 (W1) may not match c2 or a* (W1, or dropped): its allowed neighbours are b2 and c1
    assert preds["b1"] == "C"
    assert r["per_moa"]["B"]["n"] == 2
    assert r["correct"] == sum(x["moa"] == x["predicted"] for x in r["predictions"])


def test_multi_batch_treatments_and_errors():
    p = _profiles([("a1", 1, "A", "W1;W2", 1, 0), ("a2", 1, "A", "W2", 1, 0.1),
                   ("b1", 1, "B", "W3", 0, 1), ("b2", 1, "B", "W4", 0.1, 1)])
    r = nearest_neighbor_moa(p, "nscb")
    # a1 shares W2 with a2, so a1 has only B neighbours: scored wrong
    assert {x["compound"]: x["predicted"] for x in r["predictions"]}["a1"] == "B"
    with pytest.raises(InputError, match="mode must be"):
        nearest_neighbor_moa(p, "loo")
    bad = p.copy()
    bad.loc[0, "f1"] = np.nan
    with pytest.raises(InputError, match="NaN"):
        nearest_neighbor_moa(bad, "nsc")
    out = evaluate_moa(p)
    assert set(out) == {"nsc", "nscb"} and out["nsc"]["n"] == 4


def test_knn_voting_and_single_compound_moa_warning():
    # query a1: its 3 nearest other-compound treatments are b1 (B), a2 (A), a3 (A) -> A wins the
    # vote although the single nearest one is B
    p = _profiles([
        ("a1", 1, "A", "W1", 1.0, 0.0), ("b1", 1, "B", "W2", 1.0, 0.05),
        ("a2", 1, "A", "W2", 1.0, 0.12), ("a3", 1, "A", "W3", 1.0, 0.14),
        ("b2", 1, "B", "W1", 0.0, 1.0), ("c1", 1, "C", "W1", -1.0, 0.0),
    ])
    one = {x["compound"]: x["predicted"] for x in nearest_neighbor_moa(p, "nsc")["predictions"]}
    r3 = nearest_neighbor_moa(p, "nsc", k=3)
    three = {x["compound"]: x["predicted"] for x in r3["predictions"]}
    assert one["a1"] == "B" and three["a1"] == "A" and r3["k"] == 3
    # C has one compound: never matchable under NSC, counted and named
    assert r3["per_moa"]["C"] == {"accuracy": 0.0, "correct": 0, "n": 1}
    assert any("['C'] have a single compound" in w for w in r3["warnings"])
    with pytest.raises(InputError, match="k must be"):
        nearest_neighbor_moa(p, "nsc", k=0)
