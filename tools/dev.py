#!/usr/bin/env python3
"""Set up morphoprof in a local virtual environment and run the demo or the tests.

    python3 tools/dev.py demo [morphoprof demo options]   # default output: ./demo_out
    python3 tools/dev.py test [pytest options]

Needs only python3 (>= 3.11). Creates ``.venv`` beside the project on first use and installs the
package with its dependencies; later calls reuse it and reinstall only when pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("MORPHOPROF_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")


def run(cmd: list[str | Path], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def ensure_env() -> None:
    """Create the venv and install morphoprof[dev] unless the same pyproject was installed."""
    if sys.version_info < (3, 11):  # noqa: UP036 - this script runs on the system python
        sys.exit(f"morphoprof needs Python >= 3.11; this is {sys.version.split()[0]}")
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = VENV / f".morphoprof-installed-{digest}"
    if stamp.exists() and PY.exists():
        return
    if not PY.exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(VENV)
    run([PY, "-m", "pip", "install", "--upgrade", "pip>=23.1"])
    run([PY, "-m", "pip", "install", "-e", f"{ROOT}[dev]"])
    for old in VENV.glob(".morphoprof-installed-*"):
        old.unlink()
    stamp.touch()


def ensure_chromium() -> None:
    """The report test renders the HTML report in headless Chromium (Debian's package). Install it
    with apt-get when it is missing and this user may; otherwise say that test will be skipped."""
    import shutil

    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return
    apt = shutil.which("apt-get")
    if apt and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        ok = subprocess.run([apt, "install", "-y", "-q", "chromium"], env=env).returncode == 0
        if not ok:  # stale package lists on a fresh machine
            subprocess.run([apt, "update", "-q"], env=env)
            ok = subprocess.run([apt, "install", "-y", "-q", "chromium"], env=env).returncode == 0
        if ok:
            return
    print("note: chromium is not installed and could not be installed here; the report "
          "rendering test will be skipped", flush=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "setup"}:
        print(__doc__)
        return 2
    ensure_env()
    what, rest = argv[0], argv[1:]
    try:
        if what == "demo":
            if "--out" not in rest:
                rest = ["--out", str(ROOT / "demo_out"), *rest]
            run([BIN / "morphoprof", "demo", *rest])
        elif what == "test":
            ensure_chromium()
            lint = [d for d in ("src", "tests", "benchmarks", "tools") if (ROOT / d).is_dir()]
            run([PY, "-m", "ruff", "check", *lint])
            run([PY, "-m", "pytest", "-q", *rest])
    except subprocess.CalledProcessError as exc:
        return exc.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
