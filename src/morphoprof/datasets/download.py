"""Download BBBC021 from the Broad Bioimage Benchmark Collection, resumably and verified.

The collection serves the metadata tables and one zip per plate::

    <base>/BBBC021_v1_image.csv, BBBC021_v1_compound.csv, BBBC021_v1_moa.csv
    <base>/BBBC021_v1_images_<plate>.zip     (unpacks to <plate>/<files>.tif)

:func:`download_bbbc021` fetches them into the layout :func:`morphoprof.index.import_bbbc021`
reads (``DEST/metadata/*.csv`` and ``DEST/<WeekN>/<plate>/*.tif``). Each file is fetched by
pooch (the field's data fetcher, scikit-image's among others): it skips a file already there
(unless its checksum differs from an expected one), checks optional expected checksums (sha256 or
md5) and moves a download into place only once verified. The transfer is our pooch downloader's:
partial downloads are kept as ``*.part`` and resumed with HTTP Range requests, and every file's
size is checked against the server's length. Zips are checked member by member (CRC32), and plates
are unpacked into a temporary folder and renamed into place, so an interrupted run never leaves a
half-unpacked plate. A re-run skips finished plates.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import pandas as pd
import pooch

from morphoprof.errors import DownloadError
from morphoprof.index.bbbc021 import batch_of_plate
from morphoprof.io_utils import file_digest, json_fields, new_folder, write_json
from morphoprof.logs import progress_bar

logger = logging.getLogger(__name__)

BBBC021_BASE_URL = "https://data.broadinstitute.org/bbbc/BBBC021/"
BBBC021_TABLES = ("BBBC021_v1_image.csv", "BBBC021_v1_compound.csv", "BBBC021_v1_moa.csv")
_CHUNK = 1 << 20


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _known_hash(checksum: str | None) -> str | None:
    """``"algo:hex"`` (pooch's form) of a checksum given as ``"sha256:<hex>"``, ``"md5:<hex>"``
    or a bare hex string (md5 if 32 digits long, else sha256); None for none."""
    if not checksum:
        return None
    algo, sep, value = checksum.partition(":")
    if not sep:
        algo, value = ("md5" if len(checksum) == 32 else "sha256"), checksum
    return f"{algo.strip().lower()}:{value.strip().lower()}"


@contextmanager
def _quiet(logger_: logging.Logger):
    """pooch's own log lines (one per file, and the SHA-256 of a download without a known
    hash, addressed to pooch users) are left out; ours say what is fetched."""
    level = logger_.level
    logger_.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger_.setLevel(level)


def fetch(
    url: str,
    dest: str | Path,
    checksum: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` with pooch (:func:`pooch.retrieve`), resuming a partial
    ``dest.part`` if present.

    pooch decides whether the file is needed (absent, or present with another checksum than
    ``checksum``), checks the download's checksum and moves it into place only if it matches;
    the transfer itself is :class:`RangeResumeDownloader`'s (pooch's own downloaders start
    every attempt from byte 0, a plate zip is ~1 GB).

    Args:
        url: http(s) URL.
        dest: final path; it appears only once the download is complete and verified.
        checksum: ``"sha256:<hex>"`` or ``"md5:<hex>"`` (a bare hex string is guessed by length).
        retries: attempts after a dropped connection; each resumes where the last stopped.

    Raises:
        DownloadError: HTTP errors, a size that differs from the server's, a checksum mismatch,
            a folder that cannot be written.
    """
    dest = Path(dest)
    known = _known_hash(checksum)
    try:
        with new_folder(dest.parent, dest), _quiet(pooch.get_logger()):
            _remove_stale_temporaries(dest.parent)
            got = pooch.retrieve(
                url, known_hash=known, fname=dest.name, path=dest.parent,
                downloader=RangeResumeDownloader(dest.with_name(dest.name + ".part"), retries,
                                                 timeout))
    except ValueError as exc:  # pooch: the download's hash is not the known one (it removed it)
        raise DownloadError(f"{dest.name}: {known.partition(':')[0]} checksum mismatch, the "
                            f"download was removed ({exc})") from exc
    except PermissionError as exc:
        raise DownloadError(f"cannot write to {dest.parent}: permission denied") from exc
    return Path(got)


# pooch.retrieve streams into tempfile.NamedTemporaryFile(dir=<dest folder>): a run killed
# mid-transfer leaves that empty file behind (the bytes received are in the .part file)
_POOCH_TEMPORARY = re.compile(r"tmp[a-z0-9_]{8}")


def _remove_stale_temporaries(folder: Path) -> None:
    for f in folder.iterdir():
        if _POOCH_TEMPORARY.fullmatch(f.name) and f.is_file() and f.stat().st_size == 0:
            f.unlink(missing_ok=True)


class RangeResumeDownloader:
    """A pooch downloader (``downloader(url, output_file, pooch)``) that resumes: the bytes
    received are kept in ``part`` across attempts and runs, a later request asks for the
    rest with an HTTP Range header, and the complete file (its size checked against the
    server's length) is moved to pooch's ``output_file``.

    Args:
        part: where the partial download lives (``<dest>.part``).
        retries: attempts after a dropped connection.
        timeout: seconds to wait for the server, per request.
    """

    def __init__(self, part: Path, retries: int = 3, timeout: float = 60.0) -> None:
        self.part, self.retries, self.timeout = Path(part), retries, timeout
        self.name = self.part.name.removesuffix(".part")

    def __call__(self, url: str, output_file, pooch=None) -> None:
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                if self._attempt(url):
                    os.replace(self.part, output_file)
                    return None
            except (urllib.error.URLError, OSError, HTTPException) as exc:
                last_error = exc
                time.sleep(min(2**attempt, 10) * 0.1)
        reason = getattr(last_error, "reason", None)
        if isinstance(reason, socket.gaierror):  # DNS: no network, or a proxy is needed
            last_error = (f"the host {urllib.parse.urlsplit(url).hostname} cannot be resolved "
                          f"({reason.strerror}): no network here, or set HTTPS_PROXY")
        raise DownloadError(f"{url}: download failed after {self.retries + 1} attempts: "
                            f"{last_error}")

    def _attempt(self, url: str) -> bool:
        """One request for the bytes not yet in ``part``: True once it holds the whole file."""
        start = self.part.stat().st_size if self.part.is_file() else 0
        headers = {"User-Agent": "morphoprof"}
        if start:
            headers["Range"] = f"bytes={start}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and start:  # the partial file is already complete (or too long)
                self.part.unlink()
                return False
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        with resp:
            start, mode, total = _range_of(resp, start, url)
            bar = progress_bar(total=total, initial=start, unit="B", unit_scale=True,
                               unit_divisor=1024, desc=self.name, leave=False)
            try:
                with open(self.part, mode) as f:
                    while block := resp.read(_CHUNK):
                        f.write(block)
                        bar.update(len(block))
            finally:
                bar.close()
        size = self.part.stat().st_size
        if total is not None and size < total:
            raise OSError(f"{self.name}: transfer stopped at {size} of {total} bytes")
        if total is not None and size != total:
            self.part.unlink()
            raise DownloadError(f"{self.name}: got {size} bytes, the server announced {total}")
        return True


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


@dataclass(frozen=True)
class DownloadSummary:
    """What :func:`download_bbbc021` did; ``dest/.morphoprof/last_download.json`` is its
    :meth:`to_json`.

    Attributes:
        dest: the target folder.
        fetched: plates fetched and unpacked by this call.
        skipped: plates already complete in ``dest`` (not fetched again).
        plates: the plates asked for.
    """

    dest: str
    fetched: tuple[str, ...]
    skipped: tuple[str, ...]
    plates: tuple[str, ...]

    def to_json(self) -> dict:
        """The summary file: the fields."""
        return json_fields(self)

    def summary_line(self) -> str:
        """One line for the user: plates fetched and already complete."""
        return (f"fetched {len(self.fetched)} plate(s), {len(self.skipped)} already complete, "
                f"into {self.dest}")


def download_bbbc021(
    dest: str | Path,
    plates: Sequence[str] | None = None,
    base_url: str = BBBC021_BASE_URL,
    checksums: Mapping[str, str] | None = None,
    keep_zips: bool = False,
) -> DownloadSummary:
    """Fetch BBBC021 (tables and plate zips) into ``dest`` in the importer's layout.

    Args:
        dest: target folder; tables go to ``dest/metadata``, images to ``dest/WeekN/<plate>``.
        plates: plate names to fetch (default: all 55 in the image table).
        base_url: where the collection is served (tests point it at a local server).
        checksums: optional {file name: "sha256:<hex>" or "md5:<hex>"} to enforce.
        keep_zips: keep ``dest/zips/*.zip`` after unpacking (default: delete them).

    Returns:
        The :class:`DownloadSummary`.
    """
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
        digest = _sha256_of(zip_path, checksums.get(name))
        n_files = _unpack_plate(zip_path, plate_dir)
        _check_plate(table, plate, plate_dir, name)
        write_json(done, {"zip": name, "sha256": digest, "files": n_files})
        if not keep_zips:
            zip_path.unlink()
        fetched.append(plate)
    summary = DownloadSummary(str(dest), tuple(fetched), tuple(skipped), tuple(wanted))
    write_json(state_dir / "last_download.json", summary.to_json())
    return summary


def _sha256_of(path: Path, checksum: str | None) -> str:
    """The SHA-256 of a file just fetched: the expected one where ``checksum`` gave it (pooch
    has checked the bytes against it), else read from the file."""
    known = _known_hash(checksum)
    if known and known.startswith("sha256:"):
        return known.split(":", 1)[1]
    return file_digest(path)


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
