"""The pipeline as a whole: ``demo``, ``run`` (a YAML config) and ``train``."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from morphoprof.cli.common import add_command
from morphoprof.config import (
    DEMO_CONFIG,
    load_config,
    load_train_config,
    load_weak_config,
    validate_config,
)
from morphoprof.io_utils import check_writable
from morphoprof.logs import progress
from morphoprof.models.weak_run import run_weak
from morphoprof.pipeline import run_pipeline


def cmd_run(a: argparse.Namespace) -> int:
    cfg, text = load_config(a.config)
    result = run_pipeline(cfg, text, config_path=str(Path(a.config).resolve()),
                          overwrite=a.overwrite)
    print("\n".join(result.summary_lines()))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from morphoprof.models.run import run_training

    if a.kind == "weak":
        return _train_weak(a)
    cfg, text = load_train_config(a.config, a.kind)
    check_writable(Path(cfg.output) / a.kind, folder=True)
    if a.epochs is not None:
        cfg = cfg.replace(train=cfg.train.replace(epochs=a.epochs))
    with progress(not a.quiet):
        result = run_training(a.kind, cfg, text, overwrite=a.overwrite)
    print(f"{result.summary_line()}; results in {Path(cfg.output) / a.kind / 'cv.json'}")
    return 0


def _train_weak(a: argparse.Namespace) -> int:
    cfg, text = load_weak_config(a.config)
    check_writable(Path(cfg.output) / "weak", folder=True)
    if a.epochs is not None:
        cfg = cfg.replace(train=cfg.train.replace(epochs=a.epochs))
    with progress(not a.quiet):
        s = run_weak(cfg, text, overwrite=a.overwrite)
    if s is not None:  # None: not the first process of a multi-process run
        print(s.summary_line(str(Path(cfg.output) / "weak" / "weak.json")))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    out = Path(a.out).resolve()
    raw = yaml.safe_load(DEMO_CONFIG)
    raw["output"] = str(out)
    raw["data"]["path"] = str(out / "synthetic_screen")
    cfg = validate_config(raw, "built-in demo")
    text = yaml.safe_dump(raw, sort_keys=False)
    print(f"morphoprof demo -> {out}")
    print("\n".join(run_pipeline(cfg, text).summary_lines()))
    return 0


def _add_demo(sub) -> None:
    s = add_command(sub, "demo", "run the whole pipeline on the built-in synthetic screen",
                    outputs=[("out", True)])
    s.add_argument("--out", default="demo_out", help="output folder")
    s.set_defaults(func=cmd_demo)


def _add_run(sub) -> None:
    s = add_command(sub, "run", "run the pipeline described by a YAML config (keys: the README's "
                    "'YAML config reference')")
    s.add_argument("config", help="the run configuration (YAML)")
    s.add_argument("--overwrite", action="store_true", help="replace the output's features "
                   "where an earlier run made them with other settings (refused otherwise; "
                   "finished work with the same settings is reused)")
    s.set_defaults(func=cmd_run)


def _add_train(sub) -> None:
    s = add_command(sub, "train", "train a network: finetune (Kensert 2019) or mil (Kraus 2016) "
                    "on whole images with group-held-out cross-validation, or weak (Caicedo 2018) "
                    "on single cells, then embeddings")
    s.add_argument("kind", choices=["finetune", "mil", "weak"],
                   help="finetune / mil: whole images, cross-validated; weak: single cells on "
                   "treatment labels, then embeddings")
    s.add_argument("config", help="training YAML; its keys are described in the README "
                   "sections 'Training whole-image classifiers' (finetune, mil) and 'Weakly "
                   "supervised single-cell embeddings' (weak)")
    s.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--overwrite", action="store_true", help="delete a training of the output "
                   "folder made with other settings and start over (without it, such a folder "
                   "is refused; one made with the same settings is resumed)")
    s.set_defaults(func=cmd_train)


# this module's commands, in the order the help lists them
COMMANDS = (_add_demo, _add_run, _add_train)
