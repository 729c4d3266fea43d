import os
from pathlib import Path

from morphoprof import machine


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
