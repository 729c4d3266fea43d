import os
from pathlib import Path

import joblib
import pytest

from morphoprof import machine
from morphoprof.preprocess.illumination import IlluminationConfig, compute_illumination
from morphoprof.preprocess.segmentation import NucleiSection, segment_index


def test_describe_machine_names_this_cpu_and_its_usable_cores():
    info = machine.describe_machine()
    assert info["cores"] == len(os.sched_getaffinity(0)) >= 1
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        assert info["cpu"] == names[0]
    assert info["cpu"] and info["description"].startswith(f"{info['cores']} cores of {info['cpu']}")
    assert isinstance(info["torch_threads"], int)


def test_cpu_name_without_proc_cpuinfo(monkeypatch, tmp_path):
    monkeypatch.setattr(machine, "Path", lambda _: tmp_path / "absent")
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    monkeypatch.setattr(machine.platform, "machine", lambda: "riscv64")
    assert machine.cpu_name() == "riscv64"


def test_zero_jobs_is_one_per_usable_core_and_the_stages_default(monkeypatch, tmp_path,
                                                                   tiny_screen):
    assert machine.resolve_jobs(0) == machine.usable_cores() and machine.resolve_jobs(3) == 3
    with pytest.raises(ValueError, match="n_jobs"):
        machine.resolve_jobs(-1)
    assert NucleiSection().n_jobs == IlluminationConfig().n_jobs == 0
    monkeypatch.setattr(machine, "usable_cores", lambda: 3)
    used = []
    real = joblib.Parallel

    class Recording(real):
        def __init__(self, n_jobs=None, **kwargs):
            used.append(n_jobs)
            super().__init__(n_jobs=n_jobs, **kwargs)

    monkeypatch.setattr(joblib, "Parallel", Recording)
    _, index = tiny_screen
    segment_index(index, tmp_path / "cells.parquet")
    compute_illumination(index, tmp_path / "illum", window=32)
    assert used == [3, 3]
