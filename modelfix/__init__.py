"""modelfix: repair image classifiers that learned a spurious shortcut, and prove what changed.

The public Python API; the CLI (`modelfix ...`) is a thin layer over these.
"""

__version__ = "0.1.0"

from .card import InputSpec, ModelCard  # noqa: E402
from .checkpoint import ModelOverrides, load_model, save_model  # noqa: E402
from .data import Dataset, load_data, load_scenario, parse_artifact, poison  # noqa: E402
from .errors import ModelfixError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .training import TrainConfig, train  # noqa: E402
from .zoo import Classifier, build_model  # noqa: E402

__all__ = [
    "Classifier", "Dataset", "InputSpec", "ModelCard", "ModelOverrides", "ModelfixError", "TrainConfig",
    "build_model", "evaluate", "load_data", "load_model", "load_scenario", "parse_artifact", "poison",
    "save_model", "train",
]
