"""ImageNet transfer features (Pawlowski 2016) on the real BBBC021 6-MoA fields: NSC and NSCB.

Reads ../shared/data/bbbc021/fields_6moa (660 fields, 18 compounds, 55 treatments, 6 MoAs),
extracts EfficientNet-Lite0 features with offline ImageNet weights, builds treatment profiles
(mean over a well's fields, median over a treatment's wells) and runs 1-NN cosine MoA matching
under NSC and NSCB. Variants: each stain as a greyscale image (the default, Pawlowski's best), the
three stains as RGB, random-init weights (the control), and an intermediate layer.

The PNGs are already normalised per plate against DMSO (and hold no DMSO fields), so profiles are
not normalised again.

    python benchmarks/transfer_6moa.py        # writes benchmarks/results/transfer_6moa.json
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from morphoprof.machine import describe_machine

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "bbbc021" / "fields_6moa"
RESULTS = HERE / "results" / "transfer_6moa.json"
INTERMEDIATE = "blocks.5"  # the 192-channel stage before the last block (1280 is the head)


def evaluate(features_dir: Path) -> dict:
    from morphoprof.evaluation.moa import evaluate_moa
    from morphoprof.profiles.aggregate import treatment_profiles, well_profiles
    from morphoprof.shards import read_features

    treatments = treatment_profiles(well_profiles(read_features(features_dir), "mean"), "median")
    return evaluate_moa(treatments)


def main() -> int:
    from morphoprof.io_utils import write_json

    if not DATA.is_dir():
        print(f"skipped: real data not found at {DATA}")
        return 0
    from morphoprof.features.backbones import create_backbone
    from morphoprof.features.transfer import TransferConfig, TransferExtractor
    from morphoprof.index import import_fields_6moa

    index = import_fields_6moa(DATA)
    pretrained = create_backbone("tf_efficientnet_lite0", "offline")
    random = create_backbone("tf_efficientnet_lite0", "random", seed=0)
    variants = {
        "greyscale": (TransferConfig(), pretrained),
        "rgb": (TransferConfig(channel_strategy="rgb", rgb_channels=["Actin", "Tubulin", "DAPI"]),
                pretrained),
        "random_init": (TransferConfig(), random),
        "intermediate": (TransferConfig(layer=INTERMEDIATE), pretrained),
    }
    out: dict = {"dataset": os.path.relpath(DATA, HERE.parent), "n_fields": len(index),
                 "model": "tf_efficientnet_lite0",
                 "weights": pretrained.weights, "intermediate_layer": INTERMEDIATE, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cfg, backbone) in variants.items():
            t0 = time.perf_counter()
            summary = TransferExtractor(cfg, backbone).extract(index, Path(tmp) / name)
            seconds = time.perf_counter() - t0
            res = evaluate(Path(tmp) / name)
            out["variants"][name] = {
                "nsc": res["nsc"]["accuracy"],
                "nsc_counts": f"{res['nsc']['correct']}/{res['nsc']['n']}",
                "nscb": res["nscb"]["accuracy"],
                "nscb_counts": f"{res['nscb']['correct']}/{res['nscb']['n']}",
                "nscb_dropped_moas": res["nscb"]["dropped_moas"],
                "per_moa_nsc": {m: v["accuracy"] for m, v in res["nsc"]["per_moa"].items()},
                "confusion_nsc": res["nsc"]["confusion"],
                "extract_seconds": seconds,
                "fields_per_s": summary.fields_per_s,
            }
            v = out["variants"][name]
            print(f"{name:13s} NSC {v['nsc_counts']} = {v['nsc']:.3f}   "
                  f"NSCB {v['nscb_counts']} = {v['nscb']:.3f}   {v['fields_per_s']:.1f} fields/s",
                  flush=True)
    g = out["variants"]
    out.update({
        "nsc": g["greyscale"]["nsc"],
        "nscb": g["greyscale"]["nscb"],
        "nsc_rgb": g["rgb"]["nsc"],
        "nsc_random_init": g["random_init"]["nsc"],
        "nsc_intermediate": g["intermediate"]["nsc"],
        "fields_per_s": g["greyscale"]["fields_per_s"],
        "goal_nsc_at_least": 0.96,
        "machine": describe_machine(),
    })
    write_json(RESULTS, out)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
