"""modelfix: repair image classifiers that learned a spurious shortcut, and prove what changed.

The public Python API; the CLI (`modelfix ...`) is a thin layer over the application layer (`modelfix.app`).
Names are imported on first use, so `import modelfix` (and `modelfix --version`) does not import torch.
"""

import importlib

from . import repair  # a callable package: `modelfix.repair(model, data, method, **options)`

__version__ = "0.1.0"

_PUBLIC = {
    "InputSpec": "card", "ModelCard": "card", "ModelOverrides": "checkpoint", "load_model": "checkpoint",
    "save_model": "checkpoint", "Dataset": "data", "load_data": "data", "load_scenario": "data",
    "parse_artifact": "data", "poison": "data", "ModelfixError": "errors", "evaluate": "evaluate",
    "TrainConfig": "training", "train": "training", "Classifier": "zoo", "build_model": "zoo",
    "RepairResult": "repair.result", "list_methods": "repair.registry", "get_method": "repair.registry",
    "compare": "app.compare",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        module = importlib.import_module(f"{__name__}.{_PUBLIC[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modelfix' has no attribute '{name}'")


__all__ = ["__version__", "repair", *_PUBLIC]
