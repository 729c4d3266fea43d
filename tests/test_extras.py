"""Optional dependencies: one list (morphoprof.extras), declared alike in pyproject.toml, and
a profiling path that runs without any of them."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from morphoprof.extras import EXTRAS, MissingExtra, require

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = [m for mods in EXTRAS.values() for m in mods]


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_pyproject_declares_the_extras_the_code_requires():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["optional-dependencies"]
    core = {_name(r) for r in project["dependencies"]}
    for extra, modules in EXTRAS.items():
        names = {_name(r) for r in declared[extra]}
        for module, (dist, _) in modules.items():
            assert _name(dist) in names, f"{module}: {dist} not in the {extra!r} extra"
            assert _name(dist) not in core, f"{dist} is optional but also a core dependency"
    assert declared["all"] == [f"morphoprof[{','.join(EXTRAS)}]"]
    assert "morphoprof[all]" in declared["dev"]  # the README's test command installs them all


@pytest.mark.parametrize("module", OPTIONAL)
def test_a_missing_extra_is_one_line_naming_the_install(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with pytest.raises(MissingExtra, match=r"pip install 'morphoprof\[\w+\]'"):
        require(module)


def test_profiling_runs_without_any_extra(tmp_path, tiny_screen):
    """import -> extract (transfer) -> aggregate -> evaluate with every optional module
    blocked, as for a user who installed plain ``morphoprof``."""
    screen, _ = tiny_screen
    script = f"""
import sys
sys.modules.update({{m: None for m in {OPTIONAL!r}}})
from morphoprof.cli import main
out = {str(tmp_path)!r}
assert main(["extract", {str(screen / 'index.parquet')!r}, "--out", out + "/f",
             "--image-size", "64"]) == 0
assert main(["aggregate", out + "/f", "--out", out + "/p"]) == 0
assert main(["evaluate", out + "/p/treatments.parquet", "--out", out + "/e.json"]) == 0
assert main(["extract", {str(screen / 'index.parquet')!r}, "--out", out + "/c",
             "--extractor", "classical"]) != 0
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "error: extract --extractor classical needs cp_measure" in run.stderr
    assert (tmp_path / "e.json").is_file()
