"""Profiles written by morphoprof load unchanged in pycytominer and copairs, and give the same
numbers there."""

import numpy as np
import pandas as pd
import pytest

from morphoprof.profiles.aggregate import aggregate_parquet
from morphoprof.profiles.normalize import normalize
from tests.test_profiles_cli import cell_table

pycytominer = pytest.importorskip("pycytominer")


def test_pycytominer_aggregates_and_normalizes_our_tables_to_the_same_numbers(tmp_path):
    cells = cell_table().rename(columns=lambda c: c.replace("Metadata_Plate", "Metadata_plate")
                                .replace("Metadata_Well", "Metadata_well")
                                .replace("Metadata_broad_sample", "Metadata_compound"))
    cells["Metadata_control"] = cells["Metadata_compound"] == "DMSO"
    cells.to_parquet(tmp_path / "cells.parquet")
    ours = aggregate_parquet(tmp_path / "cells.parquet", ["Metadata_plate", "Metadata_well"])
    feats = [c for c in ours.columns if not c.startswith("Metadata_")]
    theirs = pycytominer.aggregate(pd.read_parquet(tmp_path / "cells.parquet"),
                                   strata=["Metadata_plate", "Metadata_well"],
                                   features=feats, operation="mean")
    m = ours.merge(theirs, on=["Metadata_plate", "Metadata_well"], suffixes=("", "_pcm"))
    np.testing.assert_allclose(m[feats].to_numpy(), m[[f + "_pcm" for f in feats]].to_numpy(),
                               rtol=1e-5, atol=1e-5)
    # our well profiles go straight into pycytominer.normalize (deep features are not named
    # like CellProfiler's, so the feature list is given; metadata is inferred)
    wells = ours.copy()
    ours_std = normalize(wells, "standardize", by=None)
    theirs_std = pycytominer.normalize(wells, features=feats, meta_features="infer",
                                       samples="Metadata_control == True",
                                       method="standardize")
    np.testing.assert_allclose(ours_std[feats].to_numpy(), theirs_std[feats].to_numpy(),
                               rtol=1e-4, atol=1e-4)


def test_copairs_reads_our_profiles_unchanged(tmp_path):
    from copairs.map import average_precision

    from morphoprof.evaluation.retrieval import consistency_map
    from morphoprof.profiles.aggregate import treatment_profiles
    from tests.test_evaluation_evaluate import make_wells

    t = treatment_profiles(make_wells())
    t.to_parquet(tmp_path / "treatments.parquet")
    loaded = pd.read_parquet(tmp_path / "treatments.parquet")
    meta = loaded.filter(regex="^Metadata_")
    feats = loaded.drop(columns=meta.columns).to_numpy()
    ap = average_precision(meta, feats, pos_sameby=["Metadata_moa"],
                           pos_diffby=["Metadata_compound"], neg_sameby=[],
                           neg_diffby=["Metadata_moa"], progress_bar=False)
    table, _ = consistency_map(loaded, null_size=100)
    want = ap.groupby("Metadata_moa")["average_precision"].mean()
    got = table.set_index("Metadata_moa")["mean_average_precision"]
    np.testing.assert_allclose(got.loc[want.index], want, rtol=1e-9)
