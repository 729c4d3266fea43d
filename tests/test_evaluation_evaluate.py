import numpy as np
import pandas as pd
import pytest

from morphoprof.errors import InputError
from morphoprof.evaluation.evaluate import evaluate, is_well_level


def make_wells(seed=0, n_moa=3, cpd_per_moa=3, batches=3, reps=2, n_ctrl=3, d=12):
    """Well profiles: MoA signal + compound offset + noise; compounds live in one batch each,
    MoAs span batches; every plate (one per batch) has control wells."""
    rng = np.random.default_rng(seed)
    moa_c = rng.normal(size=(n_moa, d)) * 2
    rows = []
    for m in range(n_moa):
        for c in range(cpd_per_moa):
            batch = f"Week{(m + c) % batches + 1}"
            centre = moa_c[m] + 0.5 * rng.normal(size=d)
            for dose in (1.0, 3.0):
                for r in range(reps):
                    f = centre * dose / 2 + rng.normal(size=d) * 0.7
                    rows.append({"Metadata_plate": batch + "_P1",
                                 "Metadata_well": f"m{m}c{c}d{dose}r{r}",
                                 "Metadata_batch": batch, "Metadata_compound": f"m{m}c{c}",
                                 "Metadata_concentration": dose, "Metadata_moa": f"M{m}",
                                 "Metadata_control": False, "Metadata_count": 20 + r,
                                 **{f"f{i}": f[i] for i in range(d)}})
    for b in range(batches):
        for k in range(n_ctrl):
            f = rng.normal(size=d) * 0.7
            rows.append({"Metadata_plate": f"Week{b + 1}_P1", "Metadata_well": f"ctrl{k}",
                         "Metadata_batch": f"Week{b + 1}", "Metadata_compound": "DMSO",
                         "Metadata_concentration": 0.0, "Metadata_moa": "",
                         "Metadata_control": True, "Metadata_count": 25,
                         **{f"f{i}": f[i] for i in range(d)}})
    return pd.DataFrame(rows)


def test_evaluate_wells_gives_every_metric():
    wells = make_wells()
    assert is_well_level(wells)
    r = evaluate(wells, k_values=(3,), null_size=500)
    assert r.level == "wells" and r.n_treatments == 18
    assert set(r.nsc) >= {"accuracy", "correct", "n", "per_moa", "confusion"}
    assert r.nsc["n"] == 18 and r.nsc["accuracy"] > 0.8  # a strong, clean MoA signal
    assert r.nscb["n"] == 18 and r.knn["k3"]["nsc"]["n"] == 18
    assert r.map["moa"]["mean_map"] > 0.7 and r.map["activity"]["n_groups"] == 18
    assert r.replicate_accuracy["n"] == 36
    assert r.conformal["n"] == 18 and r.warnings == ()
    # treatment-level input gives the same NSC and no replicate metrics
    from morphoprof.profiles.aggregate import treatment_profiles

    t = evaluate(treatment_profiles(wells), k_values=(), null_size=500)
    assert t.level == "treatments" and t.nsc["correct"] == r.nsc["correct"]
    assert "activity" not in t.map and t.replicate_accuracy is None
    # too few permutations for any p-value to fall below 0.05: said, for each mAP, not only
    # shown as "retrieved 0%" beside a perfect mAP
    few = evaluate(wells, k_values=(), null_size=19)
    assert few.map["moa"]["fraction_retrieved"] == 0.0 < r.map["moa"]["fraction_retrieved"]
    said = [w for w in few.warnings if "with 19 permutations no p-value" in w]
    assert len(said) == 2 and "at least 20" in said[0]
    assert evaluate(wells, k_values=(), null_size=20).warnings == ()


def test_bad_tables_give_clear_messages():
    wells = make_wells()
    with pytest.raises(InputError, match=r"lack metadata column\(s\) \['Metadata_moa'\]"):
        evaluate(wells.drop(columns="Metadata_moa"))
    # treatments without MoA are reported, not silently scored or dropped
    w = wells.copy()
    w.loc[w.Metadata_compound == "m0c0", "Metadata_moa"] = ""
    r = evaluate(w, k_values=(), null_size=200)
    assert r.nsc["n"] == 16 and "2 treatment(s) have no MoA" in r.warnings[0]
    # a single-compound MoA under NSC is named
    w = wells[~wells.Metadata_compound.isin(["m2c1", "m2c2"])]
    r = evaluate(w, k_values=(), null_size=200)
    assert any("['M2'] have a single compound" in x for x in r.warnings)
    bad = wells.copy()
    bad.loc[0, "f1"] = np.inf
    with pytest.raises(InputError, match="NaN or infinite"):
        evaluate(bad)


def test_evaluation_is_typed_and_round_trips_through_its_json():
    import dataclasses
    import json

    from morphoprof.evaluation.evaluate import Evaluation

    r = evaluate(make_wells(), k_values=(3,), null_size=200)
    assert isinstance(r, Evaluation)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.level = "treatments"
    data = json.loads(json.dumps(r.to_json()))  # what evaluation.json holds
    assert list(data)[:4] == ["level", "n_treatments", "n_annotated_treatments", "nsc"]
    assert Evaluation.from_json(data) == Evaluation.from_json(r.to_json())
    assert Evaluation.from_json(data).nsc == r.nsc and data["warnings"] == []
    only = r.protocols(["nsc"])
    assert only.nscb is None and "nscb" not in only.to_json() and list(only.scores()) == ["nsc"]
    lines = r.summary_lines()
    assert lines[0] == f"NSC: {r.nsc['correct']}/{r.nsc['n']} = {100 * r.nsc['accuracy']:.1f}%"
    assert any(line.startswith("mAP (moa): ") for line in lines)
    # the NSC / NSCB of evaluate_moa alone is an evaluation too (the report reads either)
    assert Evaluation.from_json({"nsc": r.nsc}).scores() == {"nsc": r.nsc}
