"""Feature output as Parquet shards plus a manifest, so long runs resume and never half-write.

Layout of a feature folder::

    OUT/manifest.json            {"params": {...}, "shards": {key: {"file", "rows", "sha256"}}}
    OUT/shards/<key>.parquet     Metadata_* columns, then feature columns

A shard is written to a temporary name and renamed; the manifest is rewritten (atomically) after
each shard. A re-run with the same parameters skips the shards already in the manifest (when the
file is there with its recorded SHA-256; otherwise the shard is recomputed); a re-run
with different parameters is refused unless the folder is cleared.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pandas as pd

from morphoprof.errors import InputError
from morphoprof.io_utils import read_parquet, write_json, write_parquet

MANIFEST = "manifest.json"


def shard_key(*parts: object) -> str:
    """A file-name-safe shard key from plate names, chunk numbers..."""
    return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", str(p)) for p in parts)


class ShardWriter:
    """Write feature shards into ``out`` and keep its manifest.

    Args:
        out: the feature folder.
        params: everything that determines the features (model, weights, sizes...); a folder
            holding shards made with other params is refused.
        overwrite: clear a folder made with other params instead of refusing.
    """

    def __init__(self, out: str | Path, params: dict, overwrite: bool = False) -> None:
        self.out = Path(out)
        self.params = json.loads(json.dumps(params))  # normalise tuples etc. for comparison
        manifest = self.out / MANIFEST
        self.shards: dict[str, dict] = {}
        self.recomputed: list[str] = []  # finished shards found damaged: computed again
        if manifest.is_file():
            saved = json.loads(manifest.read_text())
            if saved.get("params") != self.params:
                if not overwrite:
                    raise InputError(
                        f"{self.out} holds features made with other parameters "
                        f"({_diff(saved.get('params', {}), self.params)}); use another output "
                        "folder or --overwrite"
                    )
                shutil.rmtree(self.out)
            else:
                # a listed shard counts as done only if its file is there with its checksum
                # (a file replaced or damaged since is recomputed)
                for k, v in saved.get("shards", {}).items():
                    path = self.out / v["file"]
                    if not path.is_file():
                        self.recomputed.append(f"{path}: missing since the last run")
                    elif _sha256(path) != v.get("sha256"):
                        self.recomputed.append(f"{path}: changed since the last run (its "
                                               "SHA-256 differs from the manifest's)")
                    else:
                        self.shards[k] = v
        (self.out / "shards").mkdir(parents=True, exist_ok=True)
        # temporary files of a run that was killed before it could rename them (one run per
        # folder at a time: a second run would also remove the first one's)
        for stale in [*self.out.glob(".*.tmp-*"), *(self.out / "shards").glob(".*.tmp-*")]:
            stale.unlink(missing_ok=True)

    def done(self, key: str) -> bool:
        """Whether shard ``key`` was finished by an earlier run."""
        return key in self.shards

    def write(self, key: str, df: pd.DataFrame, skipped: list | None = None) -> Path:
        """Write one shard atomically and record it in the manifest, with the inputs it
        ``skipped`` (``[{"row", "reason"}]``)."""
        info = write_shard(self.out, key, df)
        self.record(key, {**info, "skipped": skipped or []})
        return self.out / info["file"]

    def record(self, key: str, info: dict) -> None:
        """Record a shard written by :func:`write_shard` (e.g. on a cluster worker)."""
        self.shards[key] = {k: info[k] for k in ("file", "rows", "sha256")}
        if info.get("skipped"):
            self.shards[key]["skipped"] = list(info["skipped"])
        self._save()

    def skipped(self) -> list[dict]:
        """Every input skipped by the shards in the manifest (this run's and earlier runs')."""
        return [s for info in self.shards.values() for s in info.get("skipped", [])]

    def finish(self, summary: dict, on_error: str, log=print) -> dict:
        """Complete a run's ``summary`` with the on-error policy and every skipped input (this
        run's and earlier runs'), show each skip through ``log``, and write it as
        ``run_summary.json`` in the folder; returns it."""
        skipped = self.skipped()
        if log:
            for s in skipped:
                log(f"skipped {s['reason']}")
            for r in self.recomputed:
                log(f"warning: shard {r}: recomputed")
        summary = {**summary, "on_error": on_error, "n_skipped": len(skipped),
                   "skipped": skipped, "shards_recomputed": self.recomputed}
        write_json(self.out / "run_summary.json", summary)
        return summary

    def _save(self) -> None:
        write_json(self.out / MANIFEST, {"params": self.params, "shards": self.shards})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(out: str | Path, key: str, df: pd.DataFrame) -> dict:
    """Write ``df`` as shard ``key`` of the feature folder ``out`` (atomically) and return its
    manifest entry ``{"key", "file", "rows", "sha256"}``; the manifest itself is not touched."""
    rel = f"shards/{key}.parquet"
    path = write_parquet(Path(out) / rel, df)
    digest = _sha256(path)
    return {"key": key, "file": rel, "rows": int(len(df)), "sha256": digest}


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:5]) or "?"


def shard_files(folder: str | Path) -> list[Path]:
    """The shard files of a feature folder, in manifest order. Raises InputError naming the
    folder when it has no manifest, the manifest lists no shards, or a listed shard is missing."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise InputError(f"{folder} is not a feature folder (no {MANIFEST})")
    shards = json.loads(manifest.read_text()).get("shards", {})
    if not shards:
        raise InputError(f"{folder}: the manifest lists no shards")
    files = []
    for key, info in shards.items():
        path = folder / info["file"]
        if not path.is_file():
            raise InputError(f"{folder}: shard {key} is listed but {path} is missing")
        files.append(path)
    return files


def read_features(folder: str | Path) -> pd.DataFrame:
    """Concatenate a feature folder's shards (in manifest order) into one DataFrame.

    Also accepts a single Parquet file. Raises InputError naming the folder when it has no
    manifest or a shard is missing.
    """
    folder = Path(folder)
    if folder.is_file():
        return read_parquet(folder)
    return pd.concat([read_parquet(f) for f in shard_files(folder)], ignore_index=True)


def feature_columns(df: pd.DataFrame) -> list[str]:
    """All non-metadata columns (cytomining convention: metadata columns start ``Metadata_``)."""
    return [c for c in df.columns if not c.startswith("Metadata_")]
