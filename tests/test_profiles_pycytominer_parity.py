"""pycytominer's operations that users expect by name: results equal pycytominer's on the same
table (inverse_normal, mad_robustize, MODZ consensus, the feature blocklist)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pycytominer
import pytest

from morphoprof.cli import main
from morphoprof.errors import InputError
from morphoprof.profiles.aggregate import aggregate, modz, treatment_profiles
from morphoprof.profiles.normalize import Normalizer, normalize
from morphoprof.profiles.select import read_blocklist, select_features

FEATS = [f"Cells_AreaShape_F{j}" for j in range(8)]
META = ["Metadata_plate", "Metadata_well", "Metadata_control"]


def _wells(n: int = 240, seed: int = 0) -> pd.DataFrame:
    """Skewed (log-normal) features, as CellProfiler measurements often are."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.lognormal(sigma=1.0, size=(n, len(FEATS))), columns=FEATS)
    df.insert(0, "Metadata_plate", "P1")
    df.insert(1, "Metadata_well", [f"W{i:03d}" for i in range(n)])
    df.insert(2, "Metadata_control", rng.random(n) < 0.25)
    return df


@pytest.mark.parametrize("reference, samples", [("all", "all"),
                                                ("controls", "Metadata_control == True")])
def test_inverse_normal_equals_pycytominer(reference, samples, tmp_path):
    df = _wells()
    ours = normalize(df, "inverse_normal", by=None, reference=reference)
    theirs = pycytominer.normalize(df, features=FEATS, meta_features=META, samples=samples,
                                   method="inverse_normal")
    np.testing.assert_allclose(ours[FEATS].to_numpy(), theirs[FEATS].to_numpy(), atol=1e-5)
    # the reference rows' features become standard normal scores, whatever the skew
    ref = ours[FEATS].to_numpy()[df["Metadata_control"].to_numpy() | (reference == "all")]
    assert np.abs(np.median(ref, 0)).max() < 0.05
    assert np.abs(pd.DataFrame(ref).skew()).max() < 0.2
    # a saved normaliser re-applies exactly
    fitted = Normalizer("inverse_normal", None, reference).fit(df)
    fitted.save(tmp_path / "n.npz")
    again = Normalizer.load(tmp_path / "n.npz").transform(df)
    np.testing.assert_array_equal(again[FEATS].to_numpy(), ours[FEATS].to_numpy())


def test_mad_robustize_is_robust_and_equals_pycytominer():
    df = _wells()
    ours = normalize(df, "mad_robustize", by=None, reference="controls")
    np.testing.assert_array_equal(ours[FEATS].to_numpy(), normalize(
        df, "robust", by=None, reference="controls")[FEATS].to_numpy())
    theirs = pycytominer.normalize(df, features=FEATS, meta_features=META,
                                   samples="Metadata_control == True", method="mad_robustize")
    np.testing.assert_allclose(ours[FEATS].to_numpy(), theirs[FEATS].to_numpy(), rtol=1e-5,
                               atol=1e-5)
    assert Normalizer("mad_robustize").method == "robust"


def _replicates(seed: int = 1) -> pd.DataFrame:
    """Six treatments x four replicate wells; the fourth replicate of each is mostly noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(6):
        signal = rng.normal(size=len(FEATS)) * 2
        for r in range(4):
            noise = 4.0 if r == 3 else 0.3
            rows.append({"Metadata_compound": f"c{c}", "Metadata_concentration": 1.0,
                         "Metadata_replicate": r,
                         **dict(zip(FEATS, signal + rng.normal(size=len(FEATS)) * noise))})
    return pd.DataFrame(rows)


def test_modz_equals_pycytominer_consensus_and_downweights_the_odd_replicate():
    df = _replicates()
    key = ["Metadata_compound", "Metadata_concentration"]
    ours = aggregate(df, key, "modz")
    theirs = pycytominer.consensus(df, replicate_columns=key, operation="modz",
                                   features=FEATS).sort_values(key).reset_index(drop=True)
    np.testing.assert_allclose(ours[FEATS].to_numpy(), theirs[FEATS].to_numpy(), atol=1e-5)
    # closer than the mean to the three agreeing replicates' mean
    good = df[df["Metadata_replicate"] < 3].groupby(key)[FEATS].mean().to_numpy()
    mean = aggregate(df, key, "mean")[FEATS].to_numpy()
    assert np.abs(ours[FEATS].to_numpy() - good).mean() < 0.7 * np.abs(mean - good).mean()
    # one replicate is its own consensus; treatment profiles take modz by name
    x = df[FEATS].to_numpy()[:1]
    np.testing.assert_array_equal(modz(x), x[0])
    treatments = treatment_profiles(df.assign(Metadata_control=False), "modz")
    np.testing.assert_allclose(treatments[FEATS].to_numpy(), ours[FEATS].to_numpy())
    with pytest.raises(InputError, match="aggregation must be one of"):
        aggregate(df, key, "modz2")


def test_blocklist_default_is_pycytominers_and_files_are_read(tmp_path):
    listed = read_blocklist()
    assert len(listed) > 50 and "Nuclei_Correlation_Manders_AGP_DNA" in listed
    assert "blocklist" not in listed
    df = _wells(20)
    df["Nuclei_Correlation_Manders_AGP_DNA"] = 1.0
    out, report = select_features(df, ["blocklist"])
    assert report["blocklist"] == ["Nuclei_Correlation_Manders_AGP_DNA"]
    assert "Nuclei_Correlation_Manders_AGP_DNA" not in out.columns
    mine = tmp_path / "mine.txt"
    mine.write_text("# drop these\nCells_AreaShape_F0\n\nCells_AreaShape_F3  # noisy\n")
    out, report = select_features(df, ["blocklist"], blocklist=mine)
    assert report["blocklist"] == ["Cells_AreaShape_F0", "Cells_AreaShape_F3"]
    with pytest.raises(InputError, match="feature blocklist not found: .*absent.txt"):
        select_features(df, ["blocklist"], blocklist=tmp_path / "absent.txt")


def test_cli_takes_the_pycytominer_operations(tmp_path, capsys):
    df = _replicates().assign(Metadata_plate="P1", Metadata_control=False,
                              Metadata_moa=lambda d: np.where(
                                  d["Metadata_compound"] < "c3", "m1", "m2"))
    df["Metadata_well"] = [f"W{i:02d}" for i in range(len(df))]
    cells = tmp_path / "wells_in"
    cells.mkdir()
    df.to_parquet(cells / "wells.parquet")
    block = tmp_path / "block.txt"
    block.write_text("Cells_AreaShape_F7\n")
    assert main(["aggregate", str(cells), "--out", str(tmp_path / "p"), "--select", "blocklist",
                 "nonfinite", "--blocklist", str(block), "--treatment-aggregation", "modz",
                 "--normalize", "inverse_normal", "--reference", "all"]) == 0
    wells = pd.read_parquet(tmp_path / "p" / "wells.parquet")
    assert "Cells_AreaShape_F7" not in wells.columns
    treatments = pd.read_parquet(tmp_path / "p" / "treatments.parquet")
    expected = aggregate(wells, ["Metadata_compound", "Metadata_concentration"], "modz")
    np.testing.assert_allclose(treatments[FEATS[:7]].to_numpy(), expected[FEATS[:7]].to_numpy(),
                               atol=1e-6)
    assert main(["normalize", str(tmp_path / "p" / "wells.parquet"), "--out",
                 str(tmp_path / "n.parquet"), "--method", "mad_robustize", "--reference",
                 "all"]) == 0
    capsys.readouterr()
    assert main(["aggregate", str(cells), "--out", str(tmp_path / "q"), "--select", "blocklist",
                 "--blocklist", str(tmp_path / "none.txt"), "--normalize", "none"]) == 2
    assert "feature blocklist not found" in capsys.readouterr().err


def test_default_blocklist_without_pycytominer_says_what_to_do(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pycytominer", None)  # as if not installed
    with pytest.raises(InputError, match="pip install pycytominer, or give a blocklist file"):
        read_blocklist()
