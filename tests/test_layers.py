"""The package's layers: data flows one way, so no module imports from a layer above its own.

The test reads every module's imports (``ast``, including imports inside function bodies) and
fails on an import that runs up the layers, unless it is one of the known ones listed below,
which are still to be removed (issue 20); a listed edge that no longer exists also fails, so the
list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import morphoprof

PACKAGE = Path(morphoprof.__file__).parent

# lowest first; a module may import from its own layer and the ones before it
LAYERS = [
    {"", "errors", "io_utils", "extras", "logs", "machine", "prefetch", "shards", "distributed",
     "settings", "classification", "registry"},
    # image files (TIFF, PNG, OME-Zarr) are read below the index that lists them
    {"images"},
    {"index"},
    {"datasets", "preprocess"},
    {"features", "models"},
    {"profiles"},
    {"evaluation"},
    # the YAML boundary: composes every stage's settings models
    {"config"},
    {"report"},
    {"pipeline", "train", "extract"},
    {"cli", "__main__"},
]
RANK = {name: k for k, layer in enumerate(LAYERS) for name in layer}

# upward imports still in the code (importer layer, imported layer)
KNOWN: set[tuple[str, str]] = set()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports() -> set[tuple[str, str, str]]:
    """(importing file, its layer, imported layer) for every internal import."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        own = _layer("morphoprof." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name.startswith("morphoprof"):
                    found.add((path.relative_to(PACKAGE).as_posix(), own, _layer(name)))
    return found


def test_every_module_belongs_to_a_layer():
    layers = {own for _, own, _ in _imports()} | {p.stem if p.is_file() else p.name for p in
                                                  PACKAGE.iterdir() if not p.name.startswith(
                                                      ("_", ".")) and p.name != "py.typed"}
    layers.discard("__init__")
    assert sorted(layers - set(RANK)) == []


def test_no_import_runs_up_a_layer():
    edges = _imports()
    upward = sorted((f, a, b) for f, a, b in edges if RANK[b] > RANK[a] and (a, b) not in KNOWN)
    assert upward == [], f"imports from a layer above: {upward}"
    still = {(a, b) for _, a, b in edges if RANK[b] > RANK[a]}
    assert sorted(KNOWN - still) == [], "known upward imports that are gone: drop them from KNOWN"


def test_stages_do_not_import_shard_storage_from_features():
    # shard storage sits below every stage (preprocess writes crop shards with it)
    assert not (PACKAGE / "features" / "shards.py").exists()
    assert all(b != "features" for f, a, b in _imports() if a == "preprocess")


def test_every_function_is_shorter_than_80_lines():
    """Issue 20's bound: a function that grows past it is split into named steps."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n >= 80:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({n})")
    assert long == []


# modules that import torch (and Lightning) when imported: other modules import them inside the
# function that needs them, so that the CLI, the profiles and the evaluation start without torch
TORCH_MODULES = {"models.crossval", "models.data", "models.finetune", "models.jacobian",
                 "models.mil", "models.mil_cache", "models.run", "models.training",
                 "models.weak", "models.weak_data", "preprocess.fields", "train"}
# an import inside a function that breaks an import cycle (importer, imported)
CYCLES = {("profiles/aggregate.py", "profiles.cell_tvn")}
# third-party packages a function may import where it needs them, so that the CLI starts
# without them: slow to import (seconds after the CLI's own imports on this machine: the torch
# stack 1-2, sklearn 0.7-0.8, scipy.stats 0.58, scipy.spatial 0.23, scipy.ndimage 0.12,
# scikit-image's functions 0.2 (they load scipy), joblib 0.1; matplotlib, duckdb, dask), or an
# optional extra / a model hub's client. Every other package (numpy, pandas, pyarrow, tifffile,
# Pillow, jinja2, tqdm, yaml: 0.05 s together) is imported at the top of its module
LAZY_PACKAGES = {"torch", "torchvision", "timm", "lightning", "onnx", "onnxruntime", "scipy",
                 "sklearn", "skimage", "joblib", "matplotlib", "duckdb", "dask", "distributed",
                 "copairs", "anndata", "zarr", "cytotable", "parsl", "cp_measure", "maxflow",
                 "safetensors", "huggingface_hub"}


def test_imports_are_at_the_top_except_slow_packages_torch_modules_and_cycles():
    late = []
    for path in PACKAGE.rglob("*.py"):
        where = path.relative_to(PACKAGE).as_posix()
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.module:
                    name = node.module
                elif isinstance(node, ast.Import):
                    name = node.names[0].name
                else:
                    continue
                if name.startswith("morphoprof."):
                    own = name.removeprefix("morphoprof.")
                    if own not in TORCH_MODULES and (where, own) not in CYCLES:
                        late.append((where, node.lineno, name))
                elif name.split(".")[0] not in LAZY_PACKAGES:  # the standard library too
                    late.append((where, node.lineno, name))
    assert late == [], f"imports that belong at the top of their module: {sorted(late)}"
