"""The index a config's data section describes: generated, imported or read, with the left-out
image sets announced and a missing file named."""

from __future__ import annotations

import logging

import pytest

from morphoprof.config import load_config
from morphoprof.datasets.source import DataSection, build_index_from_config
from morphoprof.errors import InputError
from tests.conftest import shared


def _data(text: str, tmp_path) -> DataSection:
    path = tmp_path / "run.yaml"
    path.write_text(text + f"\noutput: {tmp_path / 'out'}\n")
    return load_config(path)[0].data


def test_synthetic_screen_is_written_under_out_and_an_index_file_is_read_back(tmp_path):
    data = _data("data: {source: synthetic, synthetic: {n_moas: 2, compounds_per_moa: 1, "
                 "n_batches: 1, plates_per_batch: 1, height: 64, width: 64, seed: 1}}", tmp_path)
    index = build_index_from_config(data, tmp_path / "out")
    assert (tmp_path / "out" / "synthetic_screen").is_dir() and len(index) > 0
    assert index.table["Metadata_moa"].nunique() >= 2
    index.write(tmp_path / "index.parquet")
    again = build_index_from_config(_data(f"data: {{source: index, path: "
                                          f"{tmp_path / 'index.parquet'}}}", tmp_path),
                                    tmp_path / "out")
    assert again.table.equals(index.table)
    with pytest.raises(InputError, match="nowhere.parquet"):
        build_index_from_config(DataSection(source="index",
                                            path=str(tmp_path / "nowhere.parquet")),
                                tmp_path)


def test_partial_bbbc021_download_announces_what_it_leaves_out(tmp_path, caplog):
    root = shared("bbbc021", "images")
    meta = shared("bbbc021", "metadata")
    data = _data(f"data: {{source: bbbc021, path: {root}, image_csv: "
                 f"{meta / 'BBBC021_v1_image.csv.gz'}, moa_csv: {meta / 'BBBC021_v1_moa.csv'}, "
                 "plates: [Week2_24381], only_present: true}", tmp_path)
    index = build_index_from_config(data, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(index) == 2 and lines  # s1, s2 complete; s3 (no actin file) and s4 left out


def test_every_source_has_one_importer_and_import_offers_the_importing_ones():
    import typing

    from morphoprof.cli.data import IMPORTERS
    from morphoprof.datasets.source import SOURCES, SourceName

    assert tuple(SOURCES) == typing.get_args(SourceName)
    assert set(IMPORTERS) == set(SOURCES) - {"synthetic", "index"} | {"cellprofiler"}
    with pytest.raises(InputError, match="path: required for source 'loaddata'"):
        DataSection(source="loaddata")
