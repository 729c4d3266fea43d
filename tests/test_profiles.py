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


def _correlated_wells(n_plates=3, n=80, d=4, seed=2):
    """Wells on plates whose controls differ in mean and covariance (a batch effect)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_plates):
        mix = np.eye(d) + rng.normal(scale=0.6, size=(d, d))
        shift = rng.normal(scale=3, size=d)
        for k in range(n):
            f = rng.normal(size=d) @ mix + shift
            rows.append({"Metadata_plate": f"P{p}", "Metadata_well": f"W{k:03d}",
                         "Metadata_control": k < n - 10,
                         **{f"f{j}": f[j] for j in range(d)}})
    return pd.DataFrame(rows)


WELL = ["Metadata_plate", "Metadata_well"]


def test_aggregate_parquet_matches_in_memory_aggregate(tmp_path):
    from morphoprof.profiles.aggregate import aggregate_parquet
    from morphoprof.shards import ShardWriter

    df = _fields()
    df.loc[4, "f1"] = np.nan  # skipped, as pandas skips it
    w = ShardWriter(tmp_path / "feats", {"model": "x"})
    w.write("a", df.iloc[:7])
    w.write("b", df.iloc[7:])
    for by, how in ((["Metadata_plate", "Metadata_well"], "mean"),
                    (["Metadata_compound", "Metadata_concentration"], "median")):
        got = aggregate_parquet(tmp_path / "feats", by, how)
        pd.testing.assert_frame_equal(got, aggregate(df, by, how), check_dtype=False,
                                      atol=1e-6)
    # rows in random order take the other summation path; same answer
    df.sample(frac=1, random_state=0).to_parquet(tmp_path / "shuffled.parquet")
    pd.testing.assert_frame_equal(aggregate_parquet(tmp_path / "shuffled.parquet", WELL),
                                  aggregate(df, WELL), check_dtype=False, atol=1e-6)
    t = aggregate_parquet(tmp_path / "feats", ["Metadata_compound"])
    assert t["Metadata_batch"].tolist() == ["Week1;Week2", "Week1;Week2"]
    assert "Metadata_site" not in t.columns
    with pytest.raises(InputError, match="cannot aggregate by"):
        aggregate_parquet(tmp_path / "feats", ["Metadata_nope"])
    with pytest.raises(InputError, match="no such Parquet"):
        aggregate_parquet(tmp_path / "missing", ["Metadata_plate"])
    (tmp_path / "feats" / "shards" / "b.parquet").unlink()
    with pytest.raises(InputError, match="missing"):
        aggregate_parquet(tmp_path / "feats", ["Metadata_plate"])


def test_aggregate_parquet_groups_across_batches_and_files(tmp_path, monkeypatch):
    """One read per file, summed over runs of rows: groups that span row batches and files,
    come back in a later batch (interleaved), have a missing key, or hold an integer or
    all-NaN feature give pandas' answer on the concatenated table."""
    from morphoprof.profiles import aggregate as agg

    monkeypatch.setattr(agg, "_ROW_BATCH", 12)  # several batches per file and per group
    df = pd.concat([_fields()] * 3, ignore_index=True)
    df["f_int"] = np.arange(len(df)) % 5
    df["f_nan"] = np.where(df["Metadata_plate"] == "P1", np.nan, 1.5)
    df.loc[df.index[-4:], "Metadata_well"] = None  # a group with no well
    df = pd.concat([df.iloc[:30], df.iloc[30:].sample(frac=1, random_state=0)],
                   ignore_index=True)  # runs first, then groups interleaved within a batch
    df.iloc[: len(df) // 2].to_parquet(tmp_path / "a.parquet", row_group_size=5)
    df.iloc[len(df) // 2:].to_parquet(tmp_path / "b.parquet")
    for threads in (1, 2):
        got = agg.aggregate_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], WELL,
                                    threads=threads)
        want = agg.aggregate(df, WELL)
        pd.testing.assert_frame_equal(got.fillna({"Metadata_well": "-"}),
                                      want.fillna({"Metadata_well": "-"}), check_dtype=False,
                                      atol=1e-6)
    assert got["Metadata_well"].isna().sum() == 1
    assert got["f_nan"].isna().sum() == (got["Metadata_plate"] == "P1").sum() > 0
    # a long aggregation shows its progress: rows read, both files, every batch counted
    import tqdm.auto

    from morphoprof.logs import progress

    bars, real = [], tqdm.auto.tqdm
    monkeypatch.setattr("morphoprof.logs.tqdm",  # what progress_bar makes its bars with
                        lambda *a, **k: bars.append(real(*a, **k)) or bars[-1])
    with progress(True):
        agg.aggregate_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], WELL, threads=2)
    assert bars[0].desc == "aggregating" and bars[0].total == bars[0].n == len(df)


def test_aggregate_parquet_files_that_differ_and_missing_metadata(tmp_path):
    """Files with different columns (a feature or a metadata column missing from one), a
    concentration missing (NaN) for some rows of a well, dictionary-encoded metadata: the
    answer is pandas' on the concatenated table; an unreadable file is named."""
    from morphoprof.profiles.aggregate import aggregate_parquet

    df = _fields()
    df["Metadata_source"] = "lab1"
    df.loc[[0, 1], "Metadata_concentration"] = np.nan  # P1 A01: NaN for 2 of its 3 sites
    first, second = df.iloc[:9].copy(), df.iloc[9:].drop(columns=["f2", "Metadata_source"])
    first["Metadata_compound"] = first["Metadata_compound"].astype("category")
    first.to_parquet(tmp_path / "a.parquet")
    second.to_parquet(tmp_path / "b.parquet")
    together = pd.concat([first.astype({"Metadata_compound": object}), second],
                         ignore_index=True)
    for by in (WELL, ["Metadata_plate"], ["Metadata_compound"]):
        got = aggregate_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], by)
        want = aggregate(together, by)
        pd.testing.assert_frame_equal(got, want, check_dtype=False, atol=1e-6)
    wells = aggregate_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], WELL)
    # a well's concentration is kept only if every site agrees (NaN disagrees with 0.0)
    assert "Metadata_concentration" not in wells.columns
    # f2 exists only in the first file (plate P1): P2's wells have no value, not zero
    assert wells["f2"].isna().tolist() == [False] * 3 + [True] * 3
    # Metadata_source: 'lab1' for P1, missing for P2 -> constant within every well, kept
    assert wells["Metadata_source"].tolist()[:3] == ["lab1"] * 3
    assert wells["Metadata_source"].isna().tolist()[3:] == [True] * 3
    first.iloc[:0].to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(InputError, match="cannot aggregate an empty table"):
        aggregate_parquet(tmp_path / "empty.parquet", WELL)
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="c.parquet: not a readable Parquet file"):
        aggregate_parquet([tmp_path / "a.parquet", tmp_path / "c.parquet"], WELL)
    # a text column without the Metadata_ prefix (an index.parquet's paths, a label) is not
    # a feature: named with its file before any row is read (numpy's "could not convert
    # string to float" traceback from the middle of the pass before); numbers of any kind are
    second.assign(Path_DNA="images/a.tif", n=np.int16(3), ok=True).to_parquet(
        tmp_path / "d.parquet")
    with pytest.raises(InputError, match=r"d.parquet: column 'Path_DNA' holds text, not "
                       "numbers"):
        aggregate_parquet([tmp_path / "a.parquet", tmp_path / "d.parquet"], WELL)
    got = aggregate_parquet(tmp_path / "d.parquet", WELL, features=["f1", "n", "ok"])
    assert got["n"].tolist() == [3.0] * 3 and got["ok"].tolist() == [1.0] * 3
    # the same rule in memory (pandas' "agg function failed" before)
    with pytest.raises(InputError, match=r"the table: column 'Path_DNA' holds text"):
        aggregate(pd.read_parquet(tmp_path / "d.parquet"), WELL)
    # a grouping column named without the prefix is a key, kept, never a feature, in memory
    # and streamed
    renamed = second.rename(columns={"Metadata_plate": "plate"})
    renamed.to_parquet(tmp_path / "plain.parquet")
    want = aggregate(second, WELL)
    for plain in (aggregate(renamed, ["plate", "Metadata_well"]),
                  aggregate_parquet(tmp_path / "plain.parquet", ["plate", "Metadata_well"])):
        assert plain["plate"].tolist() == want["Metadata_plate"].tolist()
        assert [c for c in plain.columns if not c.startswith("Metadata_")] == ["plate", "f1"]


def test_coral_aligns_every_plate_to_the_pooled_controls(tmp_path):
    from morphoprof.profiles.normalize import Normalizer

    df = _correlated_wells()
    feats = [f"f{j}" for j in range(4)]
    ctrl = df[df.Metadata_control]
    target_cov = np.cov(ctrl[feats].to_numpy(), rowvar=False)
    target_mean = ctrl[feats].to_numpy().mean(0)
    before = [np.cov(g[feats].to_numpy(), rowvar=False) for _, g in ctrl.groupby("Metadata_plate")]
    assert max(np.abs(c - target_cov).max() for c in before) > 0.5  # plates really differ
    out = Normalizer("coral", by="Metadata_plate", eps=1e-12).fit(df).transform(df)
    for _, g in out[out.Metadata_control].groupby("Metadata_plate"):
        x = g[feats].to_numpy(np.float64)
        np.testing.assert_allclose(np.cov(x, rowvar=False), target_cov, atol=1e-3)
        np.testing.assert_allclose(x.mean(0), target_mean, atol=1e-4)


def test_factor_analysis_profiles_match_sklearn():
    from sklearn.decomposition import FactorAnalysis

    from morphoprof.profiles.normalize import Normalizer

    df = _correlated_wells(n_plates=1, n=200, d=6)
    feats = [f"f{j}" for j in range(6)]
    n = Normalizer("factor_analysis", by=None, n_factors=2).fit(df)
    out = n.transform(df)
    assert [c for c in out.columns if not c.startswith("Metadata_")] == ["Factor_1", "Factor_2"]
    ref = df[df.Metadata_control][feats].to_numpy()
    mean, std = ref.mean(0), ref.std(0)
    fa = FactorAnalysis(2, random_state=0).fit((ref - mean) / std)
    want = fa.transform((df[feats].to_numpy() - mean) / std)
    np.testing.assert_allclose(out[["Factor_1", "Factor_2"]].to_numpy(), want, atol=1e-4)
    with pytest.raises(InputError, match="by=None"):
        Normalizer("factor_analysis", by="Metadata_plate")


@pytest.mark.parametrize("method", ["standardize", "robust", "spherize", "coral",
                                    "factor_analysis"])
def test_fitted_normalizer_saves_and_applies_to_new_data(tmp_path, method):
    from morphoprof.profiles.normalize import Normalizer

    df = _correlated_wells()
    by = None if method == "factor_analysis" else "Metadata_plate"
    n = Normalizer(method, by=by, n_factors=2).fit(df)
    path = n.save(tmp_path / "norm.npz")
    new = df.sample(frac=0.5, random_state=0)  # new rows of the same plates
    pd.testing.assert_frame_equal(Normalizer.load(path).transform(new), n.transform(new))
    if by:
        other = df.assign(Metadata_plate="P9")
        with pytest.raises(InputError, match="P9.*not in the data"):
            n.transform(other)


def test_plate_without_controls_is_named_and_fallback_is_explicit():
    from morphoprof.profiles.normalize import Normalizer

    df = _correlated_wells()
    df.loc[df.Metadata_plate == "P1", "Metadata_control"] = False
    with pytest.raises(InputError, match="Metadata_plate='P1': no reference"):
        Normalizer("standardize").fit(df)
    n = Normalizer("standardize", fallback="all").fit(df)
    assert n.warnings == ["Metadata_plate='P1': no control rows; fitted on all 80 rows"]
    out = n.transform(df)
    np.testing.assert_allclose(out[out.Metadata_plate == "P1"]["f0"].mean(), 0, atol=1e-5)
    bad = df.copy()
    bad.loc[3, "f2"] = np.inf
    with pytest.raises(InputError, match=r"\['f2'\].*NaN or infinite"):
        Normalizer("robust").fit(bad)


def test_feature_selection_reports_each_reason():
    from morphoprof.profiles.select import select_features

    rng = np.random.default_rng(0)
    n = 200
    base = rng.normal(size=n)
    df = pd.DataFrame({"Metadata_well": [f"W{i}" for i in range(n)], "a": base,
                       "a_copy": base * 2 + 0.01 * rng.normal(size=n),  # |r| ~ 1 with a
                       "b": rng.normal(size=n), "const": 1.0,
                       "rare": np.r_[np.zeros(n - 1), 1.0],  # one odd value, 2 unique
                       "nan": np.r_[np.nan, rng.normal(size=n - 1)]})
    out, report = select_features(df)
    assert report["nonfinite"] == ["nan"]
    assert sorted(report["variance"]) == ["const", "rare"]
    assert len(report["correlation"]) == 1 and report["correlation"][0] in ("a", "a_copy")
    assert "b" in out.columns and "Metadata_well" in out.columns
    kept, r2 = select_features(df, ["nonfinite"], na_cutoff=0.01)
    assert r2 == {"nonfinite": []} and "nan" in kept.columns
    with pytest.raises(InputError, match="unknown feature selection"):
        select_features(df, ["pca"])
