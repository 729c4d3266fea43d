"""Download BBBC021 from the Broad Bioimage Benchmark Collection, resumably and verified.

The collection serves the metadata tables and one zip per plate::

    <base>/BBBC021_v1_image.csv, BBBC021_v1_compound.csv, BBBC021_v1_moa.csv
    <base>/BBBC021_v1_images_<plate>.zip     (unpacks to <plate>/<files>.tif)

:func:`download_bbbc021` fetches them into the layout :func:`morphoprof.index.import_bbbc021`
reads (``DEST/metadata/*.csv`` and ``DEST/<WeekN>/<plate>/*.tif``). Partial downloads are kept as
``*.part`` and resumed with HTTP Range requests; every file's size is checked against the server's
length, zips are checked member by member (CRC32), optional expected checksums (sha256 or md5) are
enforced, and plates are unpacked into a temporary folder and renamed into place, so an
interrupted run never leaves a half-unpacked plate. A re-run skips finished plates.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from http.client import HTTPException
from pathlib import Path

from morphoprof.errors import DownloadError
from morphoprof.index.bbbc021 import batch_of_plate
from morphoprof.io_utils import file_digest, write_json
from morphoprof.logs import progress_bar

logger = logging.getLogger(__name__)

BBBC021_BASE_URL = "https://data.broadinstitute.org/bbbc/BBBC021/"
BBBC021_TABLES = ("BBBC021_v1_image.csv", "BBBC021_v1_compound.csv", "BBBC021_v1_moa.csv")
_CHUNK = 1 << 20


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _check_checksum(path: Path, expected: str, name: str) -> None:
    algo, _, value = expected.partition(":")
    if not value:
        algo, value = ("md5" if len(expected) == 32 else "sha256"), expected
    got = file_digest(path, algo)
    if got.lower() != value.lower():
        raise DownloadError(f"{name}: {algo} checksum mismatch (expected {value}, got {got})")


def fetch(
    url: str,
    dest: str | Path,
    checksum: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` if present.

    Args:
        url: http(s) URL.
        dest: final path; it appears only once the download is complete and verified.
        checksum: ``"sha256:<hex>"`` or ``"md5:<hex>"`` (a bare hex string is guessed by length).
        retries: attempts after a dropped connection; each resumes where the last stopped.

    Raises:
        DownloadError: HTTP errors, a size that differs from the server's, a checksum mismatch.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        start = part.stat().st_size if part.is_file() else 0
        headers = {"User-Agent": "morphoprof", "Range": f"bytes={start}-"} if start else {
            "User-Agent": "morphoprof"
        }
        try:
            request = urllib.request.Request(url, headers=headers)
            resp = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and start:  # the partial file is already complete (or too long)
                part.unlink()
                continue
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:
            last_error = exc
            time.sleep(min(2**attempt, 10) * 0.1)
            continue
        with resp:
            start, mode, total = _range_of(resp, start, url)
            bar = progress_bar(
                total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                desc=dest.name, leave=False,
            )
            try:
                with open(part, mode) as f:
                    while block := resp.read(_CHUNK):
                        f.write(block)
                        bar.update(len(block))
            except (OSError, HTTPException) as exc:
                last_error = exc
                continue
            finally:
                bar.close()
        size = part.stat().st_size
        if total is not None and size < total:
            last_error = DownloadError(f"{dest.name}: transfer stopped at {size} of {total} bytes")
            continue
        _verify(part, dest.name, size, total, checksum)
        os.replace(part, dest)
        return dest
    raise DownloadError(f"{url}: download failed after {retries + 1} attempts: {last_error}")


def _range_of(resp, start: int, url: str) -> tuple[int, str, int | None]:
    """(offset, file mode, total bytes or None) of the response to a request for the bytes
    from ``start`` on: appended after a partial file (206), else written from the start (the
    server ignored the Range header)."""
    if start and resp.status == 206:
        m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != start:
            raise DownloadError(f"{url}: server sent an unexpected Content-Range")
        return start, "ab", int(m.group(3)) if m.group(3) != "*" else None
    length = resp.headers.get("Content-Length")
    return 0, "wb", int(length) if length is not None else None


def _verify(part: Path, name: str, size: int, total: int | None, checksum: str | None) -> None:
    """A complete download's size against the server's and its checksum; the partial file is
    removed when either is wrong (DownloadError)."""
    if total is not None and size != total:
        part.unlink()
        raise DownloadError(f"{name}: got {size} bytes, the server announced {total}")
    if checksum:
        try:
            _check_checksum(part, checksum, name)
        except DownloadError:
            part.unlink()
            raise


def _verify_zip(path: Path) -> list[str]:
    """Names of the zip's members; raises DownloadError if the archive or a member is corrupt."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DownloadError(f"{path.name}: member {bad} fails its CRC check (corrupt)")
            return zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DownloadError(f"{path.name}: not a valid zip archive ({exc})") from exc


def _unpack_plate(zip_path: Path, plate_dir: Path) -> int:
    """Unpack a plate zip into ``plate_dir`` atomically, dropping a leading ``<plate>/`` folder."""
    tmp = plate_dir.with_name(f".{plate_dir.name}.unpacking")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    n = 0
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            parts = Path(info.filename).parts
            if parts and parts[0] == plate_dir.name and len(parts) > 1:
                parts = parts[1:]
            if any(p in ("..", "") for p in parts) or Path(info.filename).is_absolute():
                raise DownloadError(f"{zip_path.name}: unsafe member path {info.filename!r}")
            target = tmp.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
            n += 1
    if plate_dir.exists():
        shutil.rmtree(plate_dir)
    os.replace(tmp, plate_dir)
    return n


def download_bbbc021(
    dest: str | Path,
    plates: Sequence[str] | None = None,
    base_url: str = BBBC021_BASE_URL,
    checksums: Mapping[str, str] | None = None,
    keep_zips: bool = False,
) -> dict:
    """Fetch BBBC021 (tables and plate zips) into ``dest`` in the importer's layout.

    Args:
        dest: target folder; tables go to ``dest/metadata``, images to ``dest/WeekN/<plate>``.
        plates: plate names to fetch (default: all 55 in the image table).
        base_url: where the collection is served (tests point it at a local server).
        checksums: optional {file name: "sha256:<hex>" or "md5:<hex>"} to enforce.
        keep_zips: keep ``dest/zips/*.zip`` after unpacking (default: delete them).

    Returns:
        A summary: plates fetched, plates skipped as already complete, and file counts.
    """
    import pandas as pd

    dest = Path(dest)
    checksums = dict(checksums or {})
    meta_dir = dest / "metadata"
    for name in BBBC021_TABLES:
        fetch(_join(base_url, name), meta_dir / name, checksums.get(name))
    table = pd.read_csv(meta_dir / "BBBC021_v1_image.csv")
    if "Image_Metadata_Plate_DAPI" not in table.columns:
        raise DownloadError(f"{meta_dir / 'BBBC021_v1_image.csv'} has no Image_Metadata_Plate_DAPI")
    all_plates = sorted(table["Image_Metadata_Plate_DAPI"].astype(str).unique())
    wanted = list(plates) if plates else all_plates
    unknown = [p for p in wanted if p not in all_plates]
    if unknown:
        raise DownloadError(f"unknown plate(s) {unknown}; BBBC021 plates are: {all_plates}")

    state_dir = dest / ".morphoprof"
    fetched, skipped = [], []
    for k, plate in enumerate(wanted, start=1):
        batch = batch_of_plate(plate) or "unbatched"
        plate_dir = dest / batch / plate
        done = state_dir / f"{plate}.done.json"
        if done.is_file() and plate_dir.is_dir():
            skipped.append(plate)
            continue
        name = f"BBBC021_v1_images_{plate}.zip"
        zip_path = dest / "zips" / name
        logger.info(f"[{k}/{len(wanted)}] {plate}")
        _fetch_zip(_join(base_url, name), zip_path, checksums.get(name))
        digest = file_digest(zip_path)
        n_files = _unpack_plate(zip_path, plate_dir)
        _check_plate(table, plate, plate_dir, name)
        write_json(done, {"zip": name, "sha256": digest, "files": n_files})
        if not keep_zips:
            zip_path.unlink()
        fetched.append(plate)
    summary = {"dest": str(dest), "fetched": fetched, "skipped": skipped, "plates": wanted}
    write_json(state_dir / "last_download.json", summary)
    return summary


def _fetch_zip(url: str, zip_path: Path, checksum: str | None) -> None:
    """Fetch a plate zip and check the archive; a corrupt one is fetched once more from
    scratch, then is an error."""
    for attempt in range(2):
        fetch(url, zip_path, checksum)
        try:
            _verify_zip(zip_path)
            return
        except DownloadError:
            zip_path.unlink()
            if attempt == 1:
                raise


def _check_plate(table, plate: str, plate_dir: Path, name: str) -> None:
    """Every image the image table lists for ``plate`` was unpacked into ``plate_dir``."""
    expected = table.loc[table["Image_Metadata_Plate_DAPI"].astype(str) == plate]
    missing = [
        f
        for col in ("Image_FileName_DAPI", "Image_FileName_Tubulin", "Image_FileName_Actin")
        if col in expected.columns
        for f in expected[col].astype(str)
        if not (plate_dir / f).is_file()
    ]
    if missing:
        raise DownloadError(
            f"{name}: {len(missing)} image(s) listed in BBBC021_v1_image.csv are not in the "
            f"archive, e.g. {missing[:3]}"
        )


def load_checksums(path: str | Path) -> dict[str, str]:
    """Read expected checksums: JSON {name: "algo:hex"} or md5sum-style ``<hex>  <name>`` lines."""
    path = Path(path)
    text = path.read_text()
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
    except json.JSONDecodeError:
        pass
    out = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise DownloadError(f"{path} line {line_no}: expected '<hex digest>  <file name>'")
        out[fields[1].lstrip("*")] = fields[0]
    return out
