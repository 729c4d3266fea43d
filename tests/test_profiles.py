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


def test_spherize_whitens_controls_to_identity(tmp_path):
    from morphoprof.profiles.normalize import Spherize

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(6, 6))
    controls = rng.normal(size=(400, 6)) @ mix + 3.0  # strongly correlated features
    for mode in ("pca", "zca"):
        s = Spherize(mode, eps=1e-9).fit(controls)
        z = s.transform(controls)
        np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-9)
        np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(6), atol=1e-6)
    # ZCA keeps features aligned with the originals; PCA does not
    zca = Spherize("zca", 1e-9).fit(controls).transform(controls)
    assert np.corrcoef(zca[:, 0], controls[:, 0])[0, 1] > 0.3
    # fitted transforms are saved and re-applied to new data
    other = rng.normal(size=(5, 6))
    s.save(tmp_path / "tvn.npz")
    np.testing.assert_allclose(Spherize.load(tmp_path / "tvn.npz").transform(other),
                               s.transform(other))
    with pytest.raises(InputError, match="at least 2 reference"):
        Spherize().fit(controls[:1])


def test_normalize_spherize_per_plate():
    rng = np.random.default_rng(1)
    rows = []
    for plate in ("P1", "P2"):
        for k in range(60):
            f = rng.normal(size=3) @ np.array([[1, 0.8, 0], [0, 1, 0.5], [0, 0, 1.0]])
            rows.append({"Metadata_plate": plate, "Metadata_well": f"W{k}",
                         "Metadata_control": k < 50, "a": f[0], "b": f[1], "c": f[2]})
    df = pd.DataFrame(rows)
    out = normalize(df, "spherize", by="Metadata_plate", eps=1e-9)
    for _, g in out[out.Metadata_control].groupby("Metadata_plate"):
        np.testing.assert_allclose(np.cov(g[["a", "b", "c"]].to_numpy(), rowvar=False),
                                   np.eye(3), atol=1e-6)
