"""Built-in scenarios: datasets with a known spurious signal, generated deterministically from raw sources.

- `decoy-digits`: the embedded default (scikit-learn's bundled digits, no file, no network) with DecoyMNIST's
  label-coloured corner patch;
- `decoy-mnist`: Ross et al.'s DecoyMNIST as used by TAP and R4, regenerated from the MNIST idx files;
- `egem-mnist`: the EGEM paper's modified MNIST (3 pixels on 70 % of the training 8s);
- `tagged-digits`: the embedded digits with a Clever Hans tag (a white 4×4 square in the top-left corner) on 80 %
  of the training 8s — the `modelfix demo` scenario;
- `stamped-fashion`: Fashion-MNIST with a white 5×5 plus-shaped stamp near the top-left corner on 70 % of the
  training shirts, regenerated from the Fashion-MNIST idx files.

Every split is a pure function of (seed, scenario, split): each draws from its own generators, seeded from a
hash of those three, so loading one split never changes another. Each records `info["checksum"]` of its arrays.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataError
from .artifacts import CornerPatch, FixedPixels
from .dataset import Dataset
from .poison import poison
from .sources import read_idx

DIGITS = [str(i) for i in range(10)]
FASHION = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DECOY_SPLITS = ("train", "val", "val-permuted", "train-full", "clean", "test-clean", "test-contaminated",
                "test-permuted", "test-permuted-r4")
TEST_ALIAS = {"test": "test-clean"}


@dataclass(frozen=True)
class Scenario:
    """A named recipe: its splits (canonical names; `aliases` maps other accepted names onto them), the default
    split, whether it needs the MNIST idx files, and the spec of its artifact."""

    name: str
    description: str
    splits: tuple[str, ...]
    default_split: str
    needs_mnist: bool
    artifact: str
    build: Callable[[str, Path | None, int], Dataset] = field(repr=False, compare=False)
    aliases: dict = field(default_factory=dict)

    def resolve(self, split: str | None) -> str:
        """The canonical split name for `split` (None = the default), or DataError listing the valid ones."""
        if split is None:
            return self.default_split
        split = self.aliases.get(split, split)
        if split not in self.splits:
            names = list(self.splits) + [f"{a} (= {c})" for a, c in self.aliases.items()]
            raise DataError(f"scenario {self.name} has no split '{split}' (splits: {', '.join(names)})")
        return split


def split_seed(seed: int, scenario: str, split: str) -> int:
    """A 63-bit seed for one (seed, scenario, split), so every split has generators of its own."""
    digest = hashlib.sha256(f"{int(seed)}|{scenario}|{split}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _finish(data: Dataset, scenario: str, split: str, seed: int, artifact: str) -> Dataset:
    """Name the split and record where it came from, with the checksum of its arrays."""
    info = dict(data.info)
    info.update(source="scenario", scenario=scenario, split=split, seed=int(seed), artifact=artifact)
    data = data.with_(name=f"{scenario}:{split}", info=info)
    data.info["checksum"] = data.checksum()
    return data


# ---- MNIST -----------------------------------------------------------------------------------------------------


def find_mnist(data_root=None, scenario: str = "decoy-mnist", dataset: str = "MNIST") -> Path:
    """The folder holding the MNIST idx files: `data_root` (or $MODELFIX_DATA) itself, or its `MNIST/raw/`
    (`dataset="FashionMNIST"`: the Fashion-MNIST files, same names, in `FashionMNIST/raw/`)."""
    root = data_root if data_root is not None else os.environ.get("MODELFIX_DATA")
    looked = []
    if root:
        root = Path(root).expanduser()
        for cand in (root / dataset / "raw", root / "raw", root):
            looked.append(str(cand))
            if all(_idx_path(cand, name) is not None for pair in MNIST_FILES.values() for name in pair):
                return cand
    where = ", ".join(looked) if looked else "no --data-root given and MODELFIX_DATA is not set"
    raise DataError(f"scenario {scenario} needs the {dataset} idx files; pass --data-root DIR or set MODELFIX_DATA "
                    f"(looked in: {where})",
                    hint=f"DIR holds {dataset}/raw/train-images-idx3-ubyte.gz and the 3 other files")


def _idx_path(folder: Path, name: str) -> Path | None:
    for cand in (folder / f"{name}.gz", folder / name):
        if cand.is_file():
            return cand
    return None


@functools.lru_cache(maxsize=4)
def _read_mnist_cached(folder: str, part: str, mtimes: tuple) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = MNIST_FILES[part]
    images_path, labels_path = _idx_path(Path(folder), images_name), _idx_path(Path(folder), labels_name)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"MNIST files in {folder} do not match: images {images.shape}, labels {labels.shape}")
    if labels.max() > 9:
        raise DataError(f"MNIST labels in {labels_path} go up to {labels.max()}; expected 0..9")
    return images, labels


def load_mnist(part: str, data_root=None, scenario: str = "decoy-mnist", dataset: str = "MNIST") -> Dataset:
    """MNIST `train` (60k) or `test` (t10k, 10k) as x = bytes/255 (no standardisation), class names '0'..'9'
    (`dataset="FashionMNIST"`: Fashion-MNIST, class names `FASHION`)."""
    folder = find_mnist(data_root, scenario, dataset)
    paths = [_idx_path(folder, name) for name in MNIST_FILES[part]]
    images, labels = _read_mnist_cached(str(folder), part, tuple(p.stat().st_mtime for p in paths))
    x = torch.from_numpy(images.astype(np.float32)[:, None] / np.float32(255))
    names, prefix = (FASHION, "fashion") if dataset == "FashionMNIST" else (DIGITS, "mnist")
    return Dataset(x=x, y=torch.from_numpy(labels.astype(np.int64)), class_names=names, name=f"{prefix}-{part}",
                   info={"index": torch.arange(len(labels))})


def _holdout(n: int, n_val: int, seed: int, scenario: str) -> tuple[Tensor, Tensor]:
    """A seeded split of range(n) into (train, val) index sets, each in ascending order."""
    rng = np.random.default_rng(split_seed(seed, scenario, "partition"))
    perm = rng.permutation(n)
    return torch.from_numpy(np.sort(perm[n_val:])), torch.from_numpy(np.sort(perm[:n_val]))


def r4_recolour(data: Dataset, levels: Tensor, seed: int) -> Dataset:
    """R4's `randomize_img_swatch` on top of a permuted test (methods_guided_finetunes.md §2.6): in every image, each
    pixel whose byte equals the TRUE label's swatch byte (anywhere: patch or digit stroke) takes the swatch of a fresh
    uniformly random label, one draw per image. So the patch matches the label about 1 % of the time, not 10 %, and
    digit pixels of that grey level (the 255 strokes of many 0s) are recoloured too."""
    g = torch.Generator().manual_seed(seed)
    fresh = torch.randint(0, len(levels), (len(data),), generator=g)
    swatch_bytes = torch.round(levels.double() * 255)
    x_bytes = torch.round(data.x.double() * 255)
    hit = x_bytes == swatch_bytes[data.y].view(-1, 1, 1, 1)
    x = torch.where(hit, levels[fresh].view(-1, 1, 1, 1).to(data.x.dtype), data.x)
    info = dict(data.info)
    info["recoloured_pixels"] = hit.flatten(1).sum(1)
    return data.with_(x=x, info=info)


def _decoy(scenario: str, split: str, seed: int, base: Dataset) -> Dataset:
    """One DecoyMNIST split from its artifact-free items `base`: the label-coloured corner patch on every
    train/val image; `clean` (the val items without the patch: the refinement pool of the post-hoc methods), and
    clean, contaminated (true-label colour) and permuted (uniformly random colour, so 1 in 10 still matches) tests;
    `val-permuted` (the val items with a random-colour patch: where a λ sweep is chosen without touching the
    tests). Only the patch is pasted: digit pixels are never recoloured, except in `test-permuted-r4`, R4's test:
    the permuted test followed by R4's recolouring (`r4_recolour`)."""
    artifact = CornerPatch()
    s = split_seed(seed, scenario, split)
    if split in ("clean", "test-clean"):
        data = base
    elif split in ("test-permuted", "val-permuted"):
        data = poison(base, artifact, 1.0, "random", seed=s)
    elif split == "test-permuted-r4":
        data = poison(base, artifact, 1.0, "random", seed=s)
        data = r4_recolour(data, artifact.levels(), split_seed(seed, scenario, "r4-recolour"))
    else:  # train, val, train-full, test-contaminated
        data = poison(base, artifact, 1.0, "correlated", seed=s)
    return _finish(data, scenario, split, seed, str(artifact))


def _build_decoy_mnist(split: str, data_root, seed: int) -> Dataset:
    name = "decoy-mnist"
    if split.startswith("test"):
        base = load_mnist("test", data_root, name)
    else:
        base = load_mnist("train", data_root, name)
        if split in ("train", "val", "val-permuted", "clean"):
            train_idx, val_idx = _holdout(len(base), 10_000, seed, name)
            base = base.subset(train_idx if split == "train" else val_idx)
    return _decoy(name, split, seed, base)


def _build_egem_mnist(split: str, data_root, seed: int) -> Dataset:
    """EGEM modified MNIST. `train`: FixedPixels (1,2),(2,1),(2,2) = 1.0 on 70 % of the training 8s. `clean`: the
    training items without the artifact, our refinement pool (the paper used a VAE-selected pool of 39,942
    samples whose indices we cannot ship). `test`: t10k, clean (evaluate poisons it)."""
    name = "egem-mnist"
    artifact = FixedPixels()
    spec = str(artifact)
    if split == "test":
        return _finish(load_mnist("test", data_root, name), name, split, seed, spec)
    train = poison(load_mnist("train", data_root, name), artifact, 0.7, "correlated",
                   seed=split_seed(seed, name, "train"))
    if split == "clean":
        train = train.subset(~train.info["poisoned"])
    return _finish(train, name, split, seed, spec)


# ---- decoy digits (embedded default) ---------------------------------------------------------------------------


DIGIT_SIZE, DIGIT_SHIFT, TRAIN_COPIES = 20, 2, 3


@functools.lru_cache(maxsize=1)
def _digits_20() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8×8 digits (values 0..16) ÷ 16, bilinearly upsampled to 20×20, clamped to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / np.float32(16))[:, None]
    x = F.interpolate(x, size=(DIGIT_SIZE, DIGIT_SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.from_numpy(bunch.target.astype(np.int64))


def _place_digits(idx: Tensor, copies: int, seed: int) -> Dataset:
    """The digits `idx` on a 28×28 canvas, MNIST-like: a 20×20 digit centred, shifted by up to ±2 pixels per axis
    (seeded), `copies` shifted copies of each. The shifts are what make the digit a harder feature for an MLP
    than the corner patch, so ERM takes the shortcut as it does on DecoyMNIST; the digits stay learnable (an MLP
    trained without the patch reaches about 96 % on the test split)."""
    digits, labels = _digits_20()
    gen = torch.Generator().manual_seed(seed)
    base = (28 - DIGIT_SIZE) // 2
    n = len(idx)
    x = torch.zeros(copies * n, 1, 28, 28)
    shifts = torch.randint(-DIGIT_SHIFT, DIGIT_SHIFT + 1, (copies * n, 2), generator=gen)
    for i in range(copies * n):
        r, c = base + int(shifts[i, 0]), base + int(shifts[i, 1])
        x[i, :, r : r + DIGIT_SIZE, c : c + DIGIT_SIZE] = digits[idx[i % n]]
    source = idx.repeat(copies)
    return Dataset(x=x, y=labels[source], class_names=DIGITS, name="digits", info={"index": source})


def _stratified(y: np.ndarray, fractions: tuple[float, float, float], seed: int, scenario: str):
    """Seeded per-class split into (train, val, test) index sets of the given fractions, each ascending."""
    rng = np.random.default_rng(split_seed(seed, scenario, "partition"))
    parts: list[list[int]] = [[], [], []]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val, n_test = round(fractions[1] * len(idx)), round(fractions[2] * len(idx))
        n_train = len(idx) - n_val - n_test
        parts[0] += idx[:n_train].tolist()
        parts[1] += idx[n_train:n_train + n_val].tolist()
        parts[2] += idx[n_train + n_val:].tolist()
    return tuple(torch.tensor(sorted(p), dtype=torch.long) for p in parts)


def _build_decoy_digits(split: str, data_root, seed: int) -> Dataset:
    name = "decoy-digits"
    _, labels = _digits_20()
    train_idx, val_idx, test_idx = _stratified(labels.numpy(), (0.6, 0.1, 0.3), seed, name)
    idx = {"train": train_idx, "val": val_idx, "val-permuted": val_idx, "clean": val_idx,
           "train-full": torch.cat([train_idx, val_idx]).sort().values}
    copies = TRAIN_COPIES if split in ("train", "train-full") else 1
    # The three test variants share one placement, so they differ only in the patch.
    placement = "test" if split.startswith("test") else "val" if split in ("clean", "val-permuted") else split
    base = _place_digits(idx.get(split, test_idx), copies, split_seed(seed, name, f"placement-{placement}"))
    return _decoy(name, split, seed, base)


TAG_SHARE = 0.8  # of the training 8s (EGEM's modified MNIST: 70 %); the rest teach the 8's shape


def _build_tagged_digits(split: str, data_root, seed: int) -> Dataset:
    """The digits of `decoy-digits` (same 60/10/30 % partition and placement) with FixedPixels' `tag` preset on 80 %
    of the training 8s. `train`: 3 shifted copies of the training digits; `clean`: those without the tag (the
    post-hoc refinement pool, as egem-mnist's); `test`: the test digits, clean (evaluate pastes the tag).

    Unlike the label-coloured corner patch, the tag appears on some images of one class only, so a model that
    relies on it still reads the digits: its clean accuracy is high and pasting the tag drops it (the clean −
    poisoned gap measures the shortcut)."""
    name = "tagged-digits"
    artifact = FixedPixels(pixels="tag", target=8)
    _, labels = _digits_20()
    train_idx, _, test_idx = _stratified(labels.numpy(), (0.6, 0.1, 0.3), seed, "decoy-digits")
    if split == "test":
        base = _place_digits(test_idx, 1, split_seed(seed, "decoy-digits", "placement-test"))
        return _finish(base, name, split, seed, str(artifact))
    base = _place_digits(train_idx, TRAIN_COPIES, split_seed(seed, "decoy-digits", "placement-train"))
    train = poison(base, artifact, TAG_SHARE, "correlated", seed=split_seed(seed, name, "train"))
    if split == "clean":
        train = train.subset(~train.info["poisoned"])
    return _finish(train, name, split, seed, str(artifact))


# A white plus sign, 5×5, one pixel in from the top-left corner: the emptiest corner of Fashion-MNIST (a pixel
# above 0.1 in at most 9 % of the training images there).
STAMP_PIXELS = tuple((r, 3) for r in (1, 2, 4, 5)) + tuple((3, c) for c in range(1, 6))
STAMP_CLASS, STAMP_SHARE = 6, 0.7  # shirts (the class most confused with others), EGEM's share


def _build_stamped_fashion(split: str, data_root, seed: int) -> Dataset:
    """Fashion-MNIST with the stamp on 70 % of the training shirts. `train`: the 60k training items; `clean`: those
    without the stamp (the post-hoc refinement pool); `test`: t10k, clean (evaluate pastes the stamp)."""
    name = "stamped-fashion"
    artifact = FixedPixels(pixels=STAMP_PIXELS, target=STAMP_CLASS)
    spec = str(artifact)
    if split == "test":
        return _finish(load_mnist("test", data_root, name, "FashionMNIST"), name, split, seed, spec)
    train = poison(load_mnist("train", data_root, name, "FashionMNIST"), artifact, STAMP_SHARE, "correlated",
                   seed=split_seed(seed, name, "train"))
    if split == "clean":
        train = train.subset(~train.info["poisoned"])
    return _finish(train, name, split, seed, spec)


SCENARIOS: dict[str, Scenario] = {
    "decoy-digits": Scenario(
        name="decoy-digits",
        description="scikit-learn's bundled digits as 20×20 digits on a 28×28 canvas (±2 px shifts) with "
                    "DecoyMNIST's label-coloured corner patch; embedded, no download (digits split 60/10/30 % "
                    "stratified; train splits hold 3 shifted copies of each digit)",
        splits=DECOY_SPLITS, default_split="train", needs_mnist=False, artifact=str(CornerPatch()),
        build=_build_decoy_digits, aliases=dict(TEST_ALIAS)),
    "decoy-mnist": Scenario(
        name="decoy-mnist",
        description="DecoyMNIST (Ross et al.; TAP, R4): 4×4 corner patch coloured 255−25·label; train 50k / val "
                    "10k held out of MNIST train, train-full 60k (R4), clean/contaminated/permuted t10k tests",
        splits=DECOY_SPLITS, default_split="train", needs_mnist=True, artifact=str(CornerPatch()),
        build=_build_decoy_mnist, aliases=dict(TEST_ALIAS)),
    "egem-mnist": Scenario(
        name="egem-mnist",
        description="EGEM modified MNIST: pixels (1,2),(2,1),(2,2) = 1 on 70 % of the training 8s; clean = the "
                    "artifact-free training items (refinement pool); test = clean t10k",
        splits=("train", "clean", "test"), default_split="train", needs_mnist=True, artifact=str(FixedPixels()),
        build=_build_egem_mnist),
    "tagged-digits": Scenario(
        name="tagged-digits",
        description="the decoy-digits digits (embedded, no download) with a white 4×4 tag in the top-left corner "
                    "on 80 % of the training 8s: a Clever Hans shortcut; clean = the training items without the "
                    "tag; test clean (evaluate pastes the tag). The `modelfix demo` scenario",
        splits=("train", "clean", "test"), default_split="train", needs_mnist=False,
        artifact=str(FixedPixels(pixels="tag", target=8)), build=_build_tagged_digits),
    "stamped-fashion": Scenario(
        name="stamped-fashion",
        description="Fashion-MNIST with a white 5×5 plus-shaped stamp near the top-left corner on 70 % of the "
                    "training shirts (class 6); clean = the training items without the stamp; test = clean t10k "
                    "(evaluate pastes the stamp)",
        splits=("train", "clean", "test"), default_split="train", needs_mnist=True,
        artifact=str(FixedPixels(pixels=STAMP_PIXELS, target=STAMP_CLASS)), build=_build_stamped_fashion),
}


def load_scenario(name: str, split: str | None = None, data_root=None, seed: int = 0) -> Dataset:
    """One split of a built-in scenario (default split: `train`), deterministic in (seed, name, split).

    MNIST scenarios read the idx files from `data_root`, else $MODELFIX_DATA (a folder holding `MNIST/raw/` or
    the .gz files themselves).
    """
    scenario = SCENARIOS.get(name)
    if scenario is None:
        raise DataError(f"unknown scenario '{name}' (scenarios: {', '.join(SCENARIOS)})")
    split = scenario.resolve(split)
    return scenario.build(split, data_root, int(seed))
