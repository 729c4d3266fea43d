"""Weakly supervised embeddings on the synthetic screen: NSC / NSCB with mixup and the GRU
regularizer on and off, against ImageNet transfer features of the same crops.

The built-in synthetic screen (4 MoAs x 3 compounds x 2 concentrations + DMSO, 3 batches x 3
plates, 256 px fields, ~4,600 cells) is segmented; a 48 px crop is cut around every nucleus. A
ResNet18 (random init) learns the 25 treatment labels (compound x concentration, DMSO included)
from all wells, then every cell is embedded (layer3, pooled), averaged per well, centred per plate
on DMSO and matched to MoAs by 1-NN (NSC: other compounds; NSCB: other compounds and batches).
Four settings: {mixup alpha 0.2, off} x {GRU, off}. The reference: transfer features of the same
crops (EfficientNet-Lite0, offline ImageNet weights, 96 px, each stain as greyscale).

    python benchmarks/weak_synthetic.py        # writes benchmarks/results/weak_synthetic.json
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from morphoprof.machine import describe_machine

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "weak_synthetic.json"
EPOCHS = 4

CONFIG = """
data: {{source: index, path: {index}}}
label: [Metadata_compound, Metadata_concentration]
cells: {{crop_size: 48, normalization: max, segmentation: {{min_distance: 4}}}}
holdout: {{val_fraction: 0.0}}
model: {{name: resnet18, weights: random}}
weak: {{mixup_alpha: {alpha}, gru: {gru}, lengths: [3, 5, 8], shift: 3}}
train: {{epochs: {epochs}, batch_size: 64, lr: 0.001, seed: 0, patience: 0, accelerator: cpu}}
"""

PROFILES = {"well_aggregation": "mean", "treatment_aggregation": "median",
            "feature_selection": ["nonfinite"],
            "normalization": {"method": "center", "by": "plate", "reference": "controls"}}


def nsc(features: Path, out: Path) -> dict:
    from morphoprof.pipeline import build_profiles, evaluate_profiles

    out.mkdir(parents=True, exist_ok=True)
    wells, _ = build_profiles(features, PROFILES, out)
    r = evaluate_profiles(wells, out / "evaluation.json")
    return {p: {"accuracy": r.scores()[p]["accuracy"], "correct": r.scores()[p]["correct"],
                "n": r.scores()[p]["n"]}
            for p in ("nsc", "nscb")}


def main() -> int:
    import shutil

    import pandas as pd

    from morphoprof.datasets.synthetic import SynthConfig, generate_screen
    from morphoprof.features.transfer import TransferConfig, TransferExtractor
    from morphoprof.io_utils import write_json
    from morphoprof.train import train_weak_from_yaml

    smoke = "--smoke" in sys.argv
    epochs = 1 if smoke else EPOCHS
    result: dict = {"epochs": epochs, "model": "resnet18 (random init)", "crop_px": 48,
                    "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        index = generate_screen(tmp / "screen", SynthConfig())
        index.write(tmp / "index.parquet")
        cells_table = None
        for name, alpha, gru in (("mixup_gru", 0.2, True), ("mixup", 0.2, False),
                                 ("gru", 0.0, True), ("plain", 0.0, False)):
            folder = tmp / name
            if cells_table is not None:  # segment once, reuse the cell table
                folder.mkdir()
                shutil.copy(cells_table, folder / "cells.parquet")
            t0 = time.perf_counter()
            s = train_weak_from_yaml(
                CONFIG.format(index=tmp / "index.parquet", alpha=alpha,
                              gru=str(gru).lower(), epochs=epochs), folder, fresh=False)
            cells_table = folder / "cells.parquet"
            metrics = pd.read_csv(folder / "weak" / "metrics.csv").dropna(subset=["train_loss"])
            entry = {"mixup_alpha": alpha, "gru": gru, **nsc(folder / "features",
                                                               folder / "profiles"),
                     "final_train_loss": float(metrics["train_cell_loss"].iloc[-1]),
                     "final_train_acc": float(metrics["train_acc"].iloc[-1]),
                     "train_cells_per_s": s.train_cells_per_s,
                     "wall_seconds": time.perf_counter() - t0}
            result["settings"][name] = entry
            result["n_cells"] = s.cells["train"]
            print(name, entry, flush=True)
            if smoke:
                break
        cells = pd.read_parquet(cells_table)
        ex = TransferExtractor(TransferConfig(weights="offline", image_size=96, jit=False,
                                              batch_size=64))
        ex.extract_cells(index, cells, tmp / "transfer", size=48, normalization="max")
        result["transfer_crops"] = nsc(tmp / "transfer", tmp / "transfer_profiles")
        fields = TransferExtractor(TransferConfig(weights="offline"))
        fields.extract(index, tmp / "transfer_fields")
        result["transfer_fields"] = nsc(tmp / "transfer_fields", tmp / "fields_profiles")
    print({k: v for k, v in result.items() if k != "settings"})
    result["machine"] = describe_machine()
    if not smoke:
        write_json(RESULTS, result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent / "src"))
    sys.exit(main())
