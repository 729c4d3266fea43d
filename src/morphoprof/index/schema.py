"""The experiment index: one table, one row per field of view (image set).

Columns (cytomining conventions):

- ``Metadata_plate`` (str), ``Metadata_well`` (str, e.g. ``B02``), ``Metadata_site`` (int),
  ``Metadata_batch`` (str), ``Metadata_compound`` (str), ``Metadata_concentration`` (float, the
  source's unit, µM for BBBC021), ``Metadata_moa`` (str, may be empty), ``Metadata_control`` (bool);
- ``Path_<channel>`` (str): one file per named channel, in channel order; relative paths are
  resolved against the index's image root;
- ``Frame_<channel>`` (int, optional): the channel's position inside a multi-channel file
  (an RGB PNG holds three channels); absent or -1 for single-channel files.

Any other ``Metadata_*`` column is kept and carried along. On disk the index is one Parquet file;
the image root is stored in the file's schema metadata (relative to the Parquet file when possible).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from morphoprof.errors import ImageReadError, InputError, ValidationError
from morphoprof.images.read import (
    encoding_hint,
    image_exists,
    image_shape,
    read_image_set,
    read_stack,
)
from morphoprof.io_utils import arrow_file, atomic_path, frame_digest
from morphoprof.logs import progress_bar

logger = logging.getLogger(__name__)

PLATE = "Metadata_plate"
WELL = "Metadata_well"
SITE = "Metadata_site"
BATCH = "Metadata_batch"
COMPOUND = "Metadata_compound"
CONCENTRATION = "Metadata_concentration"
MOA = "Metadata_moa"
CONTROL = "Metadata_control"
REQUIRED = [PLATE, WELL, SITE, BATCH, COMPOUND, CONCENTRATION, MOA, CONTROL]
IMAGE_SET_KEY = [PLATE, WELL, SITE]
PATH_PREFIX = "Path_"
FRAME_PREFIX = "Frame_"
DEFAULT_CONTROLS = ("DMSO",)
_ROOT_KEY = b"morphoprof.root"
_SOURCE_KEY = b"morphoprof.source"


def channel_columns(table: pd.DataFrame) -> list[str]:
    """Channel names, in order, from the ``Path_<channel>`` columns of a table."""
    return [c[len(PATH_PREFIX) :] for c in table.columns if c.startswith(PATH_PREFIX)]


def describe_row(table: pd.DataFrame, i: int) -> str:
    """A short human-readable name for row ``i`` (position), e.g. ``row 12 (P1 B02 s3)``."""
    row = table.iloc[i]
    parts = [str(row[c]) for c in IMAGE_SET_KEY if c in table.columns]
    return f"row {i} ({' '.join(parts)})" if parts else f"row {i}"


@dataclass
class ExperimentIndex:
    """An experiment index table plus the root that its relative paths are resolved against.

    Attributes:
        table: one row per image set, columns as described in this module's docstring.
        root: directory against which relative ``Path_*`` entries are resolved.
    """

    table: pd.DataFrame
    root: Path
    source: str | None = None
    source_lines: np.ndarray | None = None
    left_out: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.source_lines is not None:
            self.source_lines = np.asarray(self.source_lines, dtype=np.int64)

    def describe(self, i: int) -> str:
        """Row ``i`` (position) as the user knows it: ``line 7 of images.csv (P1 B02 s3)`` when
        the index was imported from a table (1-based line, header = line 1), else
        :func:`describe_row`."""
        if self.source_lines is None:
            return describe_row(self.table, i)
        row = self.table.iloc[i]
        key = " ".join(str(row[c]) for c in IMAGE_SET_KEY if c in self.table.columns)
        return f"line {int(self.source_lines[i])} of {self.source} ({key})"

    def __len__(self) -> int:
        return len(self.table)

    def metadata(self) -> pd.DataFrame:
        """The table's ``Metadata_*`` columns (names and annotations), one row per image set:
        what a stage copies beside its output."""
        return self.table[[c for c in self.table.columns if c.startswith("Metadata_")]]

    def digest(self, rows: Sequence[int] | None = None, images_only: bool = False) -> str:
        """The image sets' identity: 16 hex digits of a SHA-256 of the table (paths, metadata,
        row order; ``rows``: those positions only) and of the root its relative paths start
        from. A resumable stage keeps it with its settings, so a re-run continues only on the
        same index. ``images_only``: only the image sets' files and names count (``Path_*``,
        ``Frame_*``, plate / well / site), not their annotations (compound, MoA...): for
        outputs without annotations (illumination functions) or whose annotations are
        refreshed (:meth:`~morphoprof.shards.ShardWriter.refresh_metadata`)."""
        table = self.table if rows is None else self.table.iloc[np.asarray(rows)]
        if images_only:
            table = table[[c for c in table.columns if c in IMAGE_SET_KEY
                           or c.startswith((PATH_PREFIX, FRAME_PREFIX))]]
        text = f"{self.root}\n{frame_digest(table)}"
        return hashlib.sha256(text.encode(errors="surrogateescape")).hexdigest()[:16]

    @property
    def channels(self) -> list[str]:
        """Channel names in order."""
        return channel_columns(self.table)

    def paths(self, i: int, channels: Sequence[str] | None = None) -> list[Path]:
        """Absolute file paths of row ``i`` (position), one per channel."""
        out = []
        for ch in channels or self.channels:  # one cell per column: no whole-row Series
            p = Path(str(self.table[PATH_PREFIX + ch].iat[i]))
            out.append(p if p.is_absolute() else self.root / p)
        return out

    def frames(self, i: int, channels: Sequence[str] | None = None) -> list[int | None]:
        """Per channel, the frame inside a multi-channel file, or None."""
        out: list[int | None] = []
        for ch in channels or self.channels:
            col = FRAME_PREFIX + ch
            value = self.table[col].iat[i] if col in self.table.columns else None
            out.append(int(value) if value is not None and pd.notna(value) and int(value) >= 0
                       else None)
        return out

    def read(self, i: int, channels: Sequence[str] | None = None, illumination=None) -> np.ndarray:
        """Read image set ``i`` as a ``(C, H, W)`` float32 stack in the files' intensity units.

        ``illumination`` (an object with ``apply(image, plate, channels)``, such as
        :class:`~morphoprof.preprocess.illumination.IlluminationCorrection`) divides the stack by
        the illumination function of the row's plate.
        """
        chans = list(channels or self.channels)
        image = read_stack(self.paths(i, chans), self.frames(i, chans), chans)
        if illumination is not None:
            image = illumination.apply(image, self.table[PLATE].iat[i], chans, out=image)
        return image

    def subset(self, mask: Sequence[bool] | pd.Series | np.ndarray) -> ExperimentIndex:
        """A new index with the rows where ``mask`` (one bool per row) is true."""
        keep = np.asarray(mask, dtype=bool)
        lines = None if self.source_lines is None else self.source_lines[keep]
        return ExperimentIndex(self.table[keep].reset_index(drop=True), self.root, self.source,
                               lines)

    def write(self, path: str | Path) -> Path:
        """Write the index as one Parquet file (atomically), root stored in its metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            root = os.path.relpath(self.root.resolve(), path.parent.resolve())
        except ValueError:  # different drives on Windows
            root = str(self.root.resolve())
        table = pa.Table.from_pandas(self.table, preserve_index=False)
        meta = dict(table.schema.metadata or {})
        meta[_ROOT_KEY] = json.dumps(root).encode()
        if self.source_lines is not None:
            meta[_SOURCE_KEY] = json.dumps({"file": self.source,
                                            "lines": self.source_lines.tolist()}).encode()
        table = table.replace_schema_metadata(meta)
        with atomic_path(path) as tmp, arrow_file(tmp, "wb") as dst:
            pq.write_table(table, dst)
        return path

    @classmethod
    def read_parquet(cls, path: str | Path) -> ExperimentIndex:
        """Read an index written by :meth:`write`; raises InputError naming the file if invalid."""
        path = Path(path)
        if path.is_dir():
            inside = path / "index.parquet"
            raise InputError(f"experiment index {path} is a folder" + (
                f"; did you mean {inside}?" if inside.is_file() else ", not an index.parquet"))
        if not path.is_file():
            raise InputError(f"experiment index not found: {path}")
        try:
            with arrow_file(path) as src:
                table = pq.read_table(src)
        except Exception as exc:
            raise InputError(f"cannot read experiment index {path}: {exc}") from exc
        meta = table.schema.metadata or {}
        root = json.loads(meta[_ROOT_KEY]) if _ROOT_KEY in meta else "."
        root_path = Path(root)
        if not root_path.is_absolute():
            root_path = (path.parent / root_path).resolve()
        df = table.to_pandas()
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing or not channel_columns(df):
            what = f"missing columns {missing}" if missing else "no Path_<channel> column"
            raise InputError(f"{path} is not a morphoprof experiment index: {what}")
        src = json.loads(meta[_SOURCE_KEY]) if _SOURCE_KEY in meta else {}
        lines = src.get("lines")
        if lines is not None and len(lines) != len(df):
            lines = None  # the table was changed by another tool: positions no longer map
        return cls(df, root_path, src.get("file") if lines is not None else None, lines)

    def file_problems(self, i: int, channels: Sequence[str] | None = None,
                      absent: dict[Path, list[int]] | None = None) -> list[str]:
        """Problems of row ``i``'s files: each missing file once, naming the channels it was
        to supply (an RGB file holds several). A file whose folder does not exist (a plate not
        downloaded) is reported as that folder, once per row; with ``absent`` given, the row is
        recorded there under the folder instead, for one problem per folder over the index."""
        chans = list(channels or self.channels)
        by_file: dict[Path, list[str]] = {}
        for ch, p in zip(chans, self.paths(i, chans)):
            by_file.setdefault(p, []).append(ch)
        out, folders = [], set()
        for p, chs in by_file.items():
            if image_exists(p):
                continue
            if not p.parent.is_dir():
                if p.parent not in folders:
                    folders.add(p.parent)
                    if absent is None:
                        out.append(f"{self.describe(i)}: folder not found: {p.parent}")
                    else:
                        absent.setdefault(p.parent, []).append(i)
                continue
            what = "channel" if len(chs) == 1 else "channels"
            out.append(f"{self.describe(i)}, {what} {', '.join(chs)}: file not found: "
                       f"{p}{encoding_hint(p)}")
        return out

    def present(self, channels: Sequence[str] | None = None
                ) -> tuple[ExperimentIndex, dict[str, list[str]]]:
        """The image sets whose files all exist, and {image set: its missing files} for the
        others (see :meth:`file_problems`). For an index of a partial download."""
        left_out, keep = {}, np.ones(len(self.table), dtype=bool)
        for i in range(len(self.table)):
            found = self.file_problems(i, channels)
            if found:
                keep[i] = False
                left_out[self.describe(i)] = found
        return self.subset(keep), left_out

    def validate(
        self,
        channels: Sequence[str] | None = None,
        check_files: bool = True,
        check_shapes: bool = True,
        deep: bool = False,
    ) -> None:
        """Check the index; raise :class:`ValidationError` listing every problem found.

        Problems reported (each naming the row, as its source-table line where the index was
        imported from one, and the file): empty table, missing required columns, no channels,
        unknown channels requested, empty key fields, duplicated image sets, missing (each once)
        or unreadable files, channels of different shapes within a row, rows whose shape differs
        from the rest of the experiment; with ``deep``, files that cannot be decoded whole
        (truncated, corrupt) or hold NaN / infinite pixels, read exactly as ``extract`` will.

        Args:
            channels: channels the caller needs; an unknown name is a problem.
            check_files: check that each file exists.
            check_shapes: read each file's header (not its pixels) and compare shapes.
            deep: decode every image set's pixels (slow: reads the whole screen).
        """
        problems = validate_table(self.table, channels)
        if problems or not (check_files or check_shapes or deep):
            if problems:
                raise ValidationError("experiment index", problems)
            return
        chans = list(channels or self.channels)
        shapes: dict[int, tuple[int, int]] = {}
        rows = progress_bar(range(len(self.table)), unit="set",
                            desc="reading images" if deep else "checking image files")
        absent: dict[Path, list[int]] = {}
        for i in rows:
            missing = self.file_problems(i, chans, absent)
            problems.extend(missing)
            # nothing more to check on a row with a missing file, or one just recorded under
            # an absent folder (it is then the last row listed for that folder)
            if missing or any(absent.get(p.parent, [None])[-1] == i
                              for p in self.paths(i, chans)):
                continue
            if deep:
                reason = self._deep_problem(i, chans)
                if reason:
                    problems.append(reason)
                    continue
            if check_shapes:
                shape = self._row_shape(i, chans, problems)
                if shape is not None:
                    shapes[i] = shape
        for folder, rows_of in absent.items():
            n = len(rows_of)
            problems.append(f"folder not found: {folder} (needed by {n} image set"
                            f"{'s' if n > 1 else ''}; first: {self.describe(rows_of[0])})")
        if shapes:
            common, _ = Counter(shapes.values()).most_common(1)[0]
            for i, s in shapes.items():
                if s != common:
                    p = self.paths(i, chans)[0]
                    problems.append(
                        f"{self.describe(i)}: image shape {s} differs from the "
                        f"experiment's {common} ({p})"
                    )
        if problems:
            raise ValidationError("experiment index", problems)

    def _row_shape(self, i: int, chans: list[str], problems: list[str]
                   ) -> tuple[int, int] | None:
        """The (H, W) every channel of image set ``i`` shares, read from the file headers;
        None (and a problem added) when a file is unreadable or the channels differ."""
        row_shapes = {}
        for ch, p, fr in zip(chans, self.paths(i, chans), self.frames(i, chans)):
            try:
                row_shapes[ch] = (image_shape(p, fr), p)
            except ImageReadError as exc:
                problems.append(f"{self.describe(i)}, channel {ch}: unreadable file {p}: "
                                f"{exc}")
        distinct = {s for s, _ in row_shapes.values()}
        if len(distinct) > 1:
            desc = ", ".join(f"{ch}={s} ({p})" for ch, (s, p) in row_shapes.items())
            problems.append(f"{self.describe(i)}: channel shapes differ: {desc}")
            return None
        return distinct.pop() if distinct else None

    def _deep_problem(self, i: int, channels: list[str]) -> str:
        """Why image set ``i`` cannot be used as pixels ("" when it can): the same read and
        finiteness check as the extractors' dataset."""
        try:
            read_image_set(self, i, channels)
        except InputError as exc:
            return str(exc)
        return ""


def finish_import(index: ExperimentIndex, validate: bool = True, check_shapes: bool = False,
                  only_present: bool = False) -> ExperimentIndex:
    """The last step of every importer. ``validate``: raise every problem of the index (files
    included). ``only_present``: keep the image sets whose files all exist and record the
    others with their missing files in ``left_out`` (a partial download, logged as one warning);
    an index left with no image set is still an error."""
    if only_present:
        structural = validate_table(index.table)
        if structural:
            raise ValidationError("experiment index", structural)
        kept, left_out = index.present()
        if len(kept) == 0:
            raise ValidationError("experiment index: none of the image sets has all its files",
                                  [m for found in left_out.values() for m in found])
        kept.left_out = left_out
        index = kept
        if left_out:  # a partial download: the user learns what the index lacks
            logger.warning("\n".join(summarize_left_out(index)))
    if validate:
        index.validate(check_files=True, check_shapes=check_shapes)
    return index


def summarize_left_out(index: ExperimentIndex, shown: int = 10) -> list[str]:
    """Lines for a person about an ``only_present`` import: how many image sets were left out,
    the folders that do not exist (plates not downloaded) with their counts, then the missing
    files of the first ``shown`` other image sets."""
    if not index.left_out:
        return []
    n = len(index.left_out)
    absent: Counter = Counter()
    partial = []
    for found in index.left_out.values():
        gone = [m.split(": folder not found: ", 1)[1] for m in found
                if ": folder not found: " in m]
        absent.update(gone)
        if len(gone) < len(found):
            partial.append([m for m in found if ": folder not found: " not in m])
    lines = [f"left out {n} of {n + len(index)} image set(s) with missing files:"]
    if absent:
        lines.append(f"  {len(absent)} folder(s) not found (not downloaded?), "
                     f"{sum(absent.values())} image set(s): "
                     + ", ".join(f"{f} ({c})" for f, c in list(absent.items())[:shown])
                     + (" ..." if len(absent) > shown else ""))
    for found in partial[:shown]:
        lines += [f"  {m}" for m in found]
    if len(partial) > shown:
        lines.append(f"  ... and {len(partial) - shown} more image set(s) with missing files")
    return lines


def validate_table(table: pd.DataFrame, channels: Sequence[str] | None = None) -> list[str]:
    """Structural checks of an index table (no file access). Returns a list of problems."""
    problems: list[str] = []
    if len(table) == 0:
        return ["the experiment index is empty (no image sets)"]
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        problems.append(f"missing required column(s): {', '.join(missing)}")
    have = channel_columns(table)
    if not have:
        problems.append("no channel columns (expected one 'Path_<channel>' column per channel)")
    for ch in channels or []:
        if ch not in have:
            problems.append(f"unknown channel {ch!r}; the index has channels {have}")
    for col in [c for c in IMAGE_SET_KEY if c in table.columns] + [PATH_PREFIX + c for c in have]:
        empty = table[col].isna() | (table[col].astype(str).str.strip() == "")
        for i in np.flatnonzero(empty.to_numpy())[:50]:
            problems.append(f"{describe_row(table, int(i))}: empty value in column {col}")
    if not missing or all(c in table.columns for c in IMAGE_SET_KEY):
        dup = table.duplicated(IMAGE_SET_KEY, keep=False)
        if dup.any():
            groups = table[dup].groupby(IMAGE_SET_KEY, sort=False).groups
            for key, idx in list(groups.items())[:50]:
                pos = [int(table.index.get_loc(j)) for j in idx]
                problems.append(
                    f"rows {pos} describe the same image set (plate {key[0]}, well {key[1]}, "
                    f"site {key[2]})"
                )
    return problems


def default_site_and_concentration(records: pd.DataFrame, source: str | Path) -> pd.DataFrame:
    """Give a table of image-set records from a CSV (row ``i`` on line ``i + 2`` of
    ``source``) the site and concentration columns :func:`build_index` needs: a missing site is
    the row's order within its well, a missing concentration NaN.

    Raises:
        ValidationError: rows whose site or concentration is not a number, by CSV line.
    """
    df = records.copy()
    if SITE not in df.columns:
        df[SITE] = df.groupby([PLATE, WELL], sort=False).cumcount() + 1
    if CONCENTRATION not in df.columns:
        df[CONCENTRATION] = np.nan
    bad = pd.to_numeric(df[CONCENTRATION], errors="coerce").isna() & df[CONCENTRATION].notna()
    bad |= pd.to_numeric(df[SITE], errors="coerce").isna()
    if bad.any():
        raise ValidationError(f"importing {source}", [
            f"line {int(i) + 2}: site or concentration is not a number"
            for i in np.flatnonzero(bad.to_numpy())[:20]])
    return df


def build_index(
    records: pd.DataFrame,
    channels: Sequence[str],
    root: str | Path,
    controls: Sequence[str] = DEFAULT_CONTROLS,
    source: str | Path | None = None,
    lines: Sequence[int] | np.ndarray | None = None,
) -> ExperimentIndex:
    """Build a canonical :class:`ExperimentIndex` from a table that already has the metadata
    columns (``Metadata_moa``, ``Metadata_batch`` and ``Metadata_control`` may be missing) and one
    ``Path_<channel>`` column per name in ``channels``.

    Types are normalised (plate/well/compound/batch/moa to str, site to int, concentration to
    float), ``Metadata_control`` is set from ``controls`` when absent, and columns are ordered
    metadata first, then paths and frames in channel order. ``source`` and ``lines`` (the
    table file and, per record, its 1-based line there) let errors name the user's line.
    """
    df = records.copy()
    if MOA not in df.columns:
        df[MOA] = ""
    if BATCH not in df.columns:
        df[BATCH] = df[PLATE].astype(str)
    if CONTROL not in df.columns:
        df[CONTROL] = df[COMPOUND].astype(str).isin(list(controls))
    for col in (PLATE, WELL, BATCH, COMPOUND):
        df[col] = df[col].astype(str)
    df[MOA] = df[MOA].fillna("").astype(str)
    df[SITE] = pd.to_numeric(df[SITE], errors="raise").astype("int64")
    df[CONCENTRATION] = pd.to_numeric(df[CONCENTRATION], errors="raise").astype("float64")
    df[CONTROL] = df[CONTROL].astype(bool)
    extra_meta = [c for c in df.columns if c.startswith("Metadata_") and c not in REQUIRED]
    cols = REQUIRED + extra_meta
    for ch in channels:
        cols.append(PATH_PREFIX + ch)
        df[PATH_PREFIX + ch] = df[PATH_PREFIX + ch].fillna("").astype(str)
    for ch in channels:
        if FRAME_PREFIX + ch in df.columns:
            df[FRAME_PREFIX + ch] = df[FRAME_PREFIX + ch].fillna(-1).astype("int64")
            cols.append(FRAME_PREFIX + ch)
    order = df[IMAGE_SET_KEY].reset_index(drop=True).sort_values(
        IMAGE_SET_KEY, kind="stable").index.to_numpy()
    df = df[cols].iloc[order].reset_index(drop=True)
    if lines is not None:
        lines = np.asarray(lines, dtype=np.int64)[order]
    return ExperimentIndex(df, Path(root), str(source) if lines is not None else None, lines)


def select_mask(table: pd.DataFrame, select: dict) -> np.ndarray:
    """Rows of ``table`` whose column holds one of the listed values (``{column: [values]}``,
    a config's ``select``), as a boolean mask ``(n_rows,)``; a column or value not in the table
    is an error naming it."""
    mask = np.ones(len(table), bool)
    for col, values in (select or {}).items():
        if col not in table.columns:
            raise InputError(f"select: the table has no column {col!r}; found "
                             f"{list(table.columns)}")
        values = values if isinstance(values, list) else [values]
        have = table[col].astype(str)
        absent = [v for v in values if str(v) not in set(have)]
        if absent:
            raise InputError(f"select: {col} has no rows with value(s) {absent}")
        mask &= have.isin([str(v) for v in values]).to_numpy()
    return mask


def select_rows(index: ExperimentIndex, select: dict) -> ExperimentIndex:
    """Keep the index rows chosen by :func:`select_mask`."""
    mask = select_mask(index.table, select)
    return index.subset(mask) if not mask.all() else index
