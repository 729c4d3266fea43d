import numpy as np
import pandas as pd
import pytest

from morphoprof.errors import InputError
from morphoprof.profiles.aggregate import aggregate, treatment_profiles, well_profiles
from morphoprof.profiles.normalize import normalize


def _fields():
    rows = []
    rng = np.random.default_rng(0)
    for plate, batch, shift in (("P1", "Week1", 0.0), ("P2", "Week2", 5.0)):
        for well, cpd, conc in (("A01", "DMSO", 0.0), ("A02", "DMSO", 0.0), ("B01", "x", 1.0)):
            for site in (1, 2, 3):
                f = rng.normal(size=2) + shift + (3.0 if cpd == "x" else 0.0)
                rows.append({"Metadata_plate": plate, "Metadata_well": well,
                             "Metadata_site": site, "Metadata_batch": batch,
                             "Metadata_compound": cpd, "Metadata_concentration": conc,
                             "Metadata_moa": "" if cpd == "DMSO" else "m",
                             "Metadata_control": cpd == "DMSO", "f1": f[0], "f2": f[1]})
    return pd.DataFrame(rows)


def test_well_mean_and_counts():
    df = _fields()
    wells = well_profiles(df)
    assert len(wells) == 6 and wells["Metadata_count"].tolist() == [3] * 6
    sel = df[(df.Metadata_plate == "P2") & (df.Metadata_well == "B01")]
    got = wells[(wells.Metadata_plate == "P2") & (wells.Metadata_well == "B01")]
    assert got["f1"].iloc[0] == pytest.approx(sel["f1"].mean(), rel=1e-6)
    assert "Metadata_site" not in wells.columns  # varies within a well, so dropped
    med = aggregate(df, ["Metadata_plate", "Metadata_well"], "median")
    assert med["f2"].iloc[0] == pytest.approx(df["f2"].iloc[:3].median(), rel=1e-6)


def test_normalize_against_controls_per_plate():
    wells = well_profiles(_fields())
    n = normalize(wells, "standardize", by="Metadata_plate")
    ctrl = n[n.Metadata_control]
    for _, g in ctrl.groupby("Metadata_plate"):
        np.testing.assert_allclose(g[["f1", "f2"]].mean(), 0, atol=1e-5)
    # the plate shift of 5 cancels: treated wells of both plates end up close
    c = normalize(wells, "center", by="Metadata_plate")
    treated = c[~c.Metadata_control][["f1", "f2"]].to_numpy()
    assert np.abs(treated[0] - treated[1]).max() < 3
    r = normalize(wells, "robust", by=None, reference="all")
    assert np.median(r["f1"]) == pytest.approx(0, abs=1e-6)
    with pytest.raises(InputError, match="no reference"):
        normalize(wells[~wells.Metadata_control], "center", by="Metadata_plate")
    with pytest.raises(InputError, match="method must be one of"):
        normalize(wells, "zscore")


def test_treatment_profiles_join_batches_and_drop_controls():
    wells = well_profiles(_fields())
    t = treatment_profiles(wells)
    assert len(t) == 1 and t["Metadata_compound"].iloc[0] == "x"
    assert t["Metadata_batch"].iloc[0] == "Week1;Week2"
    assert t["Metadata_count"].iloc[0] == 6
    with pytest.raises(InputError, match="cannot aggregate by"):
        aggregate(wells, ["Metadata_nope"])


def test_drop_nonfinite_reports_what_it_drops():
    from morphoprof.profiles.select import drop_nonfinite

    df = well_profiles(_fields())
    df["f3"] = 1.0
    df.loc[2, "f3"] = np.nan
    df["f4"] = np.inf
    clean, dropped = drop_nonfinite(df)
    assert dropped == ["f3", "f4"] and "f1" in clean.columns and "f3" not in clean.columns
