"""Data for modelfix: the in-memory `Dataset`, its sources, built-in scenarios, artifacts and `poison`.

`load_data(spec)` is the one resolver behind every `--data` option.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError
from .artifacts import KINDS, Artifact, CornerPatch, FixedPixels, ImagePaste, Stripe, parse_artifact
from .dataset import Dataset
from .decode import MAX_PIXELS
from .manifest import MANIFEST_SUFFIXES, Columns, read_manifest
from .poison import LABEL_MODES, poison
from .scenarios import SCENARIOS, Scenario, find_mnist, load_mnist, load_scenario
from .source import ImageSource, open_source
from .sources import load_bundle, load_folder, read_idx, read_image, read_mask, save_bundle, save_folder
from .stream import batches, take, to_dataset
from .transforms import CROP_PCT, RESIZE_POLICIES, Augment

BUNDLE_SUFFIXES = (".npz", ".safetensors")

__all__ = [
    "Artifact", "CornerPatch", "FixedPixels", "ImagePaste", "Stripe", "KINDS", "parse_artifact",
    "Dataset", "LABEL_MODES", "poison", "SCENARIOS", "Scenario", "find_mnist", "load_mnist", "load_scenario",
    "load_bundle", "load_folder", "read_idx", "read_image", "read_mask", "save_bundle", "save_folder",
    "load_data", "masks_from_bundle", "ImageSource", "open_source", "Columns", "read_manifest", "batches",
    "take", "to_dataset", "Augment", "RESIZE_POLICIES", "CROP_PCT", "MAX_PIXELS",
]


def load_data(spec, data_root=None, seed: int = 0, mask_dir=None, class_names=None, input_spec=None,
              resize: str | None = None, crop_pct: float = CROP_PCT, columns: Columns | None = None,
              check: str = "header", skip_bad: bool = False, max_pixels: int = MAX_PIXELS):
    """A dataset from `spec`: a folder (`DIR/<class>/<file>` or `DIR/images/…` + `DIR/masks/…`), a `.csv`/`.tsv`
    manifest, a `.npz` or `.safetensors` bundle, or a scenario `NAME[:SPLIT]`. An existing path wins over a
    scenario of the same name.

    A folder without `input_spec`, `resize` or `skip_bad` is read whole into an in-memory `Dataset` (every image
    the same size, as before). A manifest, or a folder with an `input_spec` (the model's card input: channels,
    height, width) or a `resize` policy, is a lazy `ImageSource` brought to that size (`resize` default
    `shorter`, `crop_pct`; `check`, `skip_bad`, `max_pixels` for the file check): batch it with
    `modelfix.data.batches`, or `to_dataset` it for whole tensors.

    `class_names` (the model's classes) maps folder, manifest and bundle classes onto the model's indices;
    `mask_dir` is a mask folder mirroring an image folder, or a bundle holding the same items with their masks
    (what `modelfix annotate -o masks.npz` writes); `data_root` and `seed` apply to scenarios.
    """
    if isinstance(spec, (Dataset, ImageSource)):
        return spec
    if mask_dir is not None and Path(mask_dir).suffix.lower() in BUNDLE_SUFFIXES:
        data = load_data(spec, data_root=data_root, seed=seed, class_names=class_names)
        return masks_from_bundle(data, Path(mask_dir), class_names)
    text = str(spec)
    path = Path(text).expanduser()
    lazy = input_spec is not None or resize is not None or skip_bad or path.suffix.lower() in MANIFEST_SUFFIXES
    if columns is not None and path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DataError(f"manifest columns apply to .csv/.tsv manifests, not to {path}")
    if lazy and (path.is_dir() or path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES):
        size = (None, None, None) if input_spec is None else \
            (input_spec.channels, input_spec.height, input_spec.width)
        return open_source(path, *size, resize=resize or "shorter", crop_pct=crop_pct, mask_dir=mask_dir,
                           class_names=class_names, columns=columns or Columns(), check=check,
                           skip_bad=skip_bad, max_pixels=max_pixels)
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        raise DataError(f"manifest {path} does not exist")
    if path.is_dir():
        return load_folder(path, mask_dir=mask_dir, class_names=class_names)
    if path.is_file():
        if path.suffix.lower() not in BUNDLE_SUFFIXES:
            raise DataError(f"data file {path} is not a bundle (.npz or .safetensors) or a manifest (.csv, .tsv)",
                            hint="pass a folder DIR/<class>/<file>, a manifest, a bundle, or a scenario")
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
    raise DataError(f"data '{text}' is neither a folder, a bundle nor a scenario, nor a .csv/.tsv manifest "
                    f"(scenarios: {', '.join(SCENARIOS)})")


def masks_from_bundle(data: Dataset, path: Path, class_names=None) -> Dataset:
    """`data` with the masks of the bundle at `path`, which must hold the same items (images and labels) in order."""
    if not path.is_file():
        raise DataError(f"mask bundle {path} does not exist")
    bundle = load_bundle(path, class_names=class_names or list(data.class_names))
    if len(bundle) != len(data):
        raise DataError(f"mask bundle {path} holds {len(bundle)} items but the data holds {len(data)}",
                        hint="write the masks for exactly this data, e.g. `modelfix annotate ... --data SAME -o masks.npz`")
    if bundle.shape != data.shape or not torch.equal(bundle.y, data.y) or \
            not torch.allclose(bundle.x, data.x, atol=1 / 255):
        raise DataError(f"mask bundle {path} does not hold the same images and labels as the data, in the same order")
    info = {key: value for key, value in data.info.items() if key != "checksum"}
    info["mask_bundle"] = str(path)
    return data.with_(mask=bundle.mask.clone(), has_mask=bundle.has_mask.clone(), info=info)
