"""What machine a measurement ran on: CPU model, cores, torch threads, GPU.

Speeds are only comparable on one machine kind (the same code gives different ratios on an Intel
and an AMD server of the same core count), so every benchmark result records this next to its
figures.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (``model name`` in ``/proc/cpuinfo`` on Linux), else what the
    platform module knows (``platform.processor()`` or the architecture)."""
    info = Path("/proc/cpuinfo")
    try:
        for line in info.read_text().splitlines() if info.is_file() else []:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def resolve_jobs(n_jobs: int) -> int:
    """``n_jobs`` parallel jobs as a stage runs them: 0 (the settings' default) is one per
    usable core; a positive number is itself."""
    if n_jobs < 0:
        raise ValueError(f"n_jobs must be 0 (one per core) or positive, got {n_jobs}")
    return n_jobs or usable_cores()


def describe_machine() -> dict:
    """``{"cpu", "cores", "torch_threads", "gpu", "description"}`` of this machine: the CPU
    model, the cores this process may use (its CPU affinity where the OS has one), torch's
    intra-op threads, the first CUDA device's name (None without one or without torch), and
    one line for a person (``"2 cores of AMD EPYC"``)."""
    cores = usable_cores()
    threads, gpu = None, None
    try:
        import torch

        threads = torch.get_num_threads()
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = cpu_name()
    line = f"{cores} cores of {cpu}" + (f", {gpu}" if gpu else "")
    return {"cpu": cpu, "cores": cores, "torch_threads": threads, "gpu": gpu,
            "description": line}
