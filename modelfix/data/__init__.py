"""Data for modelfix: the in-memory `Dataset`, its sources, built-in scenarios, artifacts and `poison`.

`load_data(spec)` is the one resolver behind every `--data` option.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .artifacts import KINDS, Artifact, CornerPatch, FixedPixels, ImagePaste, Stripe, parse_artifact
from .dataset import Dataset
from .poison import LABEL_MODES, poison
from .scenarios import SCENARIOS, Scenario, find_mnist, load_mnist, load_scenario
from .sources import load_bundle, load_folder, read_idx, read_image, read_mask, save_bundle, save_folder

BUNDLE_SUFFIXES = (".npz", ".safetensors")

__all__ = [
    "Artifact", "CornerPatch", "FixedPixels", "ImagePaste", "Stripe", "KINDS", "parse_artifact",
    "Dataset", "LABEL_MODES", "poison", "SCENARIOS", "Scenario", "find_mnist", "load_mnist", "load_scenario",
    "load_bundle", "load_folder", "read_idx", "read_image", "read_mask", "save_bundle", "save_folder",
    "load_data",
]


def load_data(spec, data_root=None, seed: int = 0, mask_dir=None, class_names=None) -> Dataset:
    """A dataset from `spec`: a folder (`DIR/<class>/<file>` or `DIR/images/…` + `DIR/masks/…`), a `.npz` or
    `.safetensors` bundle, or a scenario `NAME[:SPLIT]`. An existing path wins over a scenario of the same name.

    `class_names` (the model's classes) maps folder and bundle classes onto the model's indices; `mask_dir` is a
    mask folder mirroring an image folder; `data_root` and `seed` apply to scenarios.
    """
    if isinstance(spec, Dataset):
        return spec
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return load_folder(path, mask_dir=mask_dir, class_names=class_names)
    if path.is_file():
        if path.suffix.lower() not in BUNDLE_SUFFIXES:
            raise DataError(f"data file {path} is not a bundle (.npz or .safetensors)",
                            hint="pass a folder DIR/<class>/<file>, a bundle, or a scenario")
        if mask_dir is not None:
            raise DataError(f"--masks applies to image folders; the bundle {path} carries its own 'mask' array")
        return load_bundle(path, class_names=class_names)
    name, _, split = text.partition(":")
    if name in SCENARIOS:
        if mask_dir is not None:
            raise DataError(f"--masks applies to image folders, not to the scenario {name}")
        data = load_scenario(name, split or None, data_root=data_root, seed=seed)
        if class_names is not None and len(class_names) != data.num_classes:
            raise DataError(f"scenario {name} has {data.num_classes} classes but the model has {len(class_names)}")
        return data
    if path.suffix.lower() in BUNDLE_SUFFIXES:
        raise DataError(f"bundle {path} does not exist")
    raise DataError(f"data '{text}' is neither a folder, a bundle nor a scenario (scenarios: {', '.join(SCENARIOS)})")
