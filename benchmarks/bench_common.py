"""What several benchmarks share: the real-data check and a fresh working folder."""

from __future__ import annotations

import shutil
from pathlib import Path


def fresh_work(data: Path, work: Path) -> bool:
    """False, after printing that the benchmark is skipped, where the real data ``data`` (a
    file or folder) is absent; otherwise ``work`` is emptied (made if missing) and True."""
    if not data.exists():
        print(f"skipped: real data not found at {data}")
        return False
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return True
