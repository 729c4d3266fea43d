"""Shared fixtures: the real BBBC021 pieces in ../shared/data (skipped when absent) and a tiny
synthetic screen generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from morphoprof.datasets.synthetic import SynthConfig, generate_screen
from morphoprof.logs import progress

PROJECT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT.parent / "shared" / "data"

TINY = SynthConfig(
    n_moas=3, compounds_per_moa=2, concentrations=(1.0,), n_batches=2, plates_per_batch=2,
    dmso_wells_per_plate=2, sites_per_well=1, height=96, width=96, cells_per_field=8, seed=3,
)


@pytest.fixture(autouse=True, scope="session")
def _own_onnx_cache(tmp_path_factory):
    """Exported ONNX graphs go to a cache of this session (also for the CLI's subprocesses),
    not the user's ~/.cache/morphoprof."""
    import os

    old = os.environ.get("MORPHOPROF_CACHE")
    os.environ["MORPHOPROF_CACHE"] = str(tmp_path_factory.mktemp("morphoprof_cache"))
    yield
    if old is None:
        del os.environ["MORPHOPROF_CACHE"]
    else:
        os.environ["MORPHOPROF_CACHE"] = old


@pytest.fixture(autouse=True)
def _no_progress_bars():
    """Tests run without progress bars (the one process-wide setting); a test about a bar
    turns it on for itself."""
    with progress(False):
        yield


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with a clear message if it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real BBBC021 data not available: {path} is absent")
    return path


@pytest.fixture(scope="session")
def tiny_screen(tmp_path_factory):
    """A tiny synthetic screen (2 batches x 2 plates, 96x96 fields): (folder, index)."""
    out = tmp_path_factory.mktemp("tiny") / "screen"
    index = generate_screen(out, TINY)
    return out, index
