"""Extraction speed on 2 CPU cores, each as a ratio to the pure forward-pass ceiling measured in
the same run (same model, same batch, tensors already in memory), timed over as many items as
the run right before and right after it (the ceiling is their mean time; ``sandwiched``).

On 2 cores the network's two threads take both cores, so reading and preprocessing run in the
main process (num_workers=0): they cost a few ms per batch, less than a DataLoader worker process
would take from the network by competing for a core.

- Single-cell crops: the 7,774 real BBBC021 crops (../shared/data/bbbc021/single_cells, 68x68,
  3 channels, uint16), zero-padded to 96 px, per-crop max rescaling, fed natively (3 channels in
  one pass) to ResNet18 and to EfficientNet-B0; reading the npz, the DataLoader and writing the
  Parquet output are all inside the timing. The peers (DeepProfiler, cp_measure, plain timm)
  are measured beside morphoprof in one run by benchmarks/peers.py, not here.
- Whole fields: the 660 real 6-MoA fields, EfficientNet-Lite0, 3 greyscale passes at 224 px.
- Classical baseline: cp_measure on the same crops (tiled into mosaics, segmented on DAPI, the
  centre nucleus of each crop measured; 2 processes), with morphoprof's default measurements
  (shape, intensity, texture, granularity) and with all of cp_measure's core measurements.

    python benchmarks/extract_speed.py     # writes benchmarks/results/extract_speed.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from morphoprof.machine import describe_machine

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "bbbc021"
RESULTS = HERE / "results" / "extract_speed.json"
CROP = 96


class NpzCrops:
    """Dataset over crops held in memory: (N, H, W, C) uint16 -> (C, 96, 96) float32 in [0, 1]
    (centred zero padding, per-crop per-channel max rescaling)."""

    def __init__(self, crops: np.ndarray, size: int = CROP) -> None:
        self.crops = crops
        self.size = size

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, k: int):
        return self.__getitems__([k])[0]

    def __getitems__(self, ks):
        """A whole batch at once (the DataLoader's batched fetch): one vectorised pad and
        rescale instead of a Python call per crop."""
        import torch

        from morphoprof.preprocess.crops import normalize_crops

        c = self.crops[np.asarray(ks)].transpose(0, 3, 1, 2).astype(np.float32)
        out = np.zeros((len(ks), c.shape[1], self.size, self.size), np.float32)
        o0, o1 = (self.size - c.shape[2]) // 2, (self.size - c.shape[3]) // 2
        out[:, :, o0 : o0 + c.shape[2], o1 : o1 + c.shape[3]] = c
        x = torch.from_numpy(normalize_crops(out, "max"))
        return [(x[j], k) for j, k in enumerate(ks)]


def forward_ceiling(extractor, shape, items: int) -> float:
    """Items/s of the network alone on a batch already in memory (after one warm-up batch),
    over as many batches as a run of ``items`` items feeds it."""
    import torch

    x = torch.rand(*shape)
    extractor.choose_engine(10_000)  # the engine a large run uses
    channels = [f"c{i}" for i in range(shape[1])]
    extractor.features_from_batch(x, channels)
    n_batches = -(-items // shape[0])
    t0 = time.perf_counter()
    for _ in range(n_batches):
        extractor.features_from_batch(x, channels)
    return n_batches * shape[0] / (time.perf_counter() - t0)


def sandwiched(extractor, shape, items: int, run) -> tuple[dict, dict]:
    """``run()``'s result, and the forward-pass ceiling timed over the same number of items
    right before and right after it: this machine's speed drifts by up to 1.5x over minutes
    (the best of three 3-batch bursts, as measured until stop 33, gave ratios of 0.76 to 1.00
    for one code), so the ceiling is the mean time of the two full-length passes around the
    run."""
    before = forward_ceiling(extractor, shape, items)
    result = run()
    after = forward_ceiling(extractor, shape, items)
    return result, {"ceiling_before_per_s": before, "ceiling_after_per_s": after,
                    "ceiling_per_s": 2 / (1 / before + 1 / after)}


def cells_run(model: str, path: Path, out: Path, batch: int = 64, workers: int = 0) -> dict:
    import pandas as pd

    from morphoprof.features.transfer import TransferConfig, TransferExtractor

    ex = TransferExtractor(TransferConfig(model=model, weights="random", channel_strategy="native",
                                          jit=True,
                                          in_chans=3, batch_size=batch, num_workers=workers))
    def run() -> tuple[int, float]:
        t0 = time.perf_counter()
        with np.load(path) as z:
            crops = z["crops"]
        index = pd.read_csv(path.with_name("index.csv"))
        x, keys = ex.features_for_dataset(NpzCrops(crops), ["DAPI", "c1", "c2"])
        meta = index.iloc[keys].reset_index(drop=True).add_prefix("Metadata_")
        df = pd.concat([meta, pd.DataFrame(x, columns=ex.column_names(["all"], x.shape[1]))],
                       axis=1)
        df.to_parquet(out, index=False)
        return len(x), time.perf_counter() - t0

    with np.load(path) as z:
        n_crops = len(z["crops"])
    (cells, seconds), ceil = sandwiched(ex, (batch, 3, CROP, CROP), n_crops, run)
    rate, ceiling = cells / seconds, ceil["ceiling_per_s"]
    print(f"{model:16s} {rate:7.1f} cells/s end to end; ceiling {ceiling:7.1f} cells/s "
          f"({rate / ceiling:.2f})", flush=True)
    return {"cells": cells, "seconds": seconds, "cells_per_s": rate,
            "ceiling_cells_per_s": ceiling, "ceiling_ratio": rate / ceiling,
            "ceiling_before_cells_per_s": ceil["ceiling_before_per_s"],
            "ceiling_after_cells_per_s": ceil["ceiling_after_per_s"],
            "batch_size": batch, "num_workers": workers}


def fields_run(tmp: Path) -> dict:
    from morphoprof.features.transfer import TransferConfig, TransferExtractor
    from morphoprof.index import import_fields_6moa

    index = import_fields_6moa(DATA / "fields_6moa")
    ex = TransferExtractor(TransferConfig(batch_size=16, num_workers=0, jit=True))
    # a batch of 16 fields x 3 stains: 48 greyscale passes, as the run feeds the network
    s, ceil = sandwiched(ex, (16, 3, 224, 224), len(index),
                         lambda: ex.extract(index, tmp / "fields"))
    rate, ceiling = s.fields_per_s, ceil["ceiling_per_s"]
    print(f"whole fields     {rate:7.2f} fields/s end to end; ceiling {ceiling:7.2f} fields/s "
          f"({rate / ceiling:.2f})", flush=True)
    return {"fields": s.image_sets, "fields_per_s": rate, "ceiling_fields_per_s": ceiling,
            "ceiling_ratio": rate / ceiling,
            "ceiling_before_fields_per_s": ceil["ceiling_before_per_s"],
            "ceiling_after_fields_per_s": ceil["ceiling_after_per_s"]}


def classical_run(path: Path, measurements, n_cells: int = 400, n_jobs: int = 2) -> dict:
    """cp_measure on mosaics of the real crops (10 x 10 crops per mosaic, DAPI segmented); one
    object per crop is measured, the nucleus at the crop's centre."""
    from joblib import Parallel, delayed

    with np.load(path) as z:
        crops = z["crops"][:n_cells].astype(np.float32)
    side = 10
    mosaics = []
    for k in range(0, len(crops), side * side):
        part = crops[k : k + side * side]
        m = np.zeros((3, side * 68, side * 68), np.float32)
        for j, c in enumerate(part):
            r, q = divmod(j, side)
            m[:, r * 68 : (r + 1) * 68, q * 68 : (q + 1) * 68] = c.transpose(2, 0, 1)
        mosaics.append(m / max(float(m.max()), 1.0))

    def measure(m):
        from morphoprof.features.classical import measure_objects
        from morphoprof.preprocess.segmentation import NucleiConfig, segment_nuclei

        labels = segment_nuclei(m[0], NucleiConfig(min_distance=6, min_area=40))
        centres = labels[34::68, 34::68].ravel()
        keep = np.zeros(int(labels.max()) + 1, bool)
        keep[centres[centres > 0]] = True
        labels = np.where(keep[labels], labels, 0)
        return len(measure_objects(m, labels, ["DAPI", "c1", "c2"], measurements))

    with Parallel(n_jobs=n_jobs) as pool:
        pool(delayed(measure)(mosaics[0][:, :136, :136]) for _ in range(n_jobs))  # warm-up
        t0 = time.perf_counter()
        counts = pool(delayed(measure)(m) for m in mosaics)
        seconds = time.perf_counter() - t0
    n = int(sum(counts))
    print(f"classical        {n / seconds:7.1f} cells/s ({n} cells, {n_jobs} processes, "
          f"{len(measurements)} measurement families)", flush=True)
    return {"cells": n, "seconds": seconds, "cells_per_s": n / seconds, "n_jobs": n_jobs,
            "measurements": list(measurements)}


def main() -> int:
    from morphoprof.io_utils import write_json

    crops_path = DATA / "single_cells" / "crops.npz"
    if not crops_path.is_file() or not (DATA / "fields_6moa").is_dir():
        print(f"skipped: real data not found under {DATA}")
        return 0
    out: dict = {"machine": describe_machine(), "crop_size": CROP}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out["resnet18"] = cells_run("resnet18", crops_path, tmp / "r18.parquet")
        out["efficientnet_b0"] = cells_run("efficientnet_b0", crops_path, tmp / "b0.parquet")
        out["whole_fields"] = fields_run(tmp)
    from cp_measure.bulk import get_core_measurements

    from morphoprof.features.classical import DEFAULT_MEASUREMENTS

    out["classical"] = classical_run(crops_path, DEFAULT_MEASUREMENTS)
    out["classical_all_core"] = classical_run(crops_path, tuple(get_core_measurements()))
    out.update({
        "cells_per_s": out["resnet18"]["cells_per_s"],
        "cells_ceiling_ratio": out["resnet18"]["ceiling_ratio"],
        "efficientnet_b0_cells_per_s": out["efficientnet_b0"]["cells_per_s"],
        "fields_per_s": out["whole_fields"]["fields_per_s"],
        "fields_ceiling_ratio": out["whole_fields"]["ceiling_ratio"],
        "classical_cells_per_s": out["classical"]["cells_per_s"],
        "deep_vs_classical_per_cell": out["resnet18"]["cells_per_s"]
        / out["classical"]["cells_per_s"],
        "deep_vs_classical_all_core_per_cell": out["resnet18"]["cells_per_s"]
        / out["classical_all_core"]["cells_per_s"],
    })
    write_json(RESULTS, out)
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
