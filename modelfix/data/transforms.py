"""From a decoded file to the model's input: channel conversion, the resize policy, optional augmentations.

Images and masks go through the same geometry: images with bilinear (antialiased) interpolation, masks with
nearest-neighbour ("nearest-exact", pixel centres), so a mask stays on the pixels of its image.

Resize policies (timm's eval transform and its alternatives):

- `shorter`: the shorter side to floor(size / crop_pct), then a centre crop of the model's size (timm: a square
  target resizes the shorter side; a non-square one resizes both sides to floor(side / crop_pct));
- `plain`: both sides straight to the model's size (aspect ratio not kept);
- `none`: the image must already have the model's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

RESIZE_POLICIES = ("shorter", "plain", "none")
CROP_PCT = 0.875  # timm's default eval crop


def check_resize(resize: str, crop_pct: float = CROP_PCT) -> None:
    """Refuse an unknown policy or a crop_pct outside (0, 1]."""
    if resize not in RESIZE_POLICIES:
        raise DataError(f"resize policy '{resize}' is not one of {', '.join(RESIZE_POLICIES)}")
    if not (isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1):
        raise DataError(f"crop_pct must lie in (0, 1], got {crop_pct!r}")


def to_channels(arr: np.ndarray, channels: int, where) -> tuple[Tensor, str]:
    """An H×W×C array (C = 1 or 3) as a C×H×W tensor with `channels` channels, and what was done.

    grey → RGB replicates the grey; RGB → grey is ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B), rounded for uint8
    as Pillow's convert("L") does up to ±1.
    """
    have = arr.shape[2]
    if channels == have:
        out, note = arr, ""
    elif have == 1 and channels == 3:
        out, note = np.repeat(arr, 3, axis=2), "grey → RGB"
    elif have == 3 and channels == 1:
        if arr.dtype == np.uint8:
            r, g, b = (arr[:, :, i].astype(np.int32) for i in range(3))
            out = ((r * 299 + g * 587 + b * 114 + 500) // 1000).astype(np.uint8)[:, :, None]
        else:
            out = (arr[:, :, :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[:, :, None]
        note = "RGB → grey (luma)"
    else:
        raise DataError(f"image {where} has {have} channels; the model takes {channels} (modelfix converts 1 ↔ 3)")
    return torch.from_numpy(np.require(out.transpose(2, 0, 1), requirements=["C", "W"])), note  # copies only if needed


def _resize(img: Tensor, mask: Tensor | None, size: list[int]) -> tuple[Tensor, Tensor | None]:
    # torchvision is imported here, not at the top: `import modelfix.data` must not pay its 1–2 s start-up
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    img = TF.resize(img, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    if mask is not None:
        mask = TF.resize(mask, size, interpolation=InterpolationMode.NEAREST_EXACT)
    return img, mask


def _centre_crop(img: Tensor, mask: Tensor | None, height: int, width: int) -> tuple[Tensor, Tensor | None]:
    from torchvision.transforms.v2 import functional as TF

    img = TF.center_crop(img, [height, width])
    return img, None if mask is None else TF.center_crop(mask, [height, width])


def fit(img: Tensor, mask: Tensor | None, height: int, width: int, resize: str = "shorter",
        crop_pct: float = CROP_PCT, where="image") -> tuple[Tensor, Tensor | None]:
    """`img` (C×H×W) and its `mask` (1×H×W or None) brought to height×width by the `resize` policy."""
    h, w = img.shape[-2:]
    if (h, w) == (height, width):  # already the model's size: left as it is under every policy (masks drawn at
        return img, mask           # model resolution stay exact; timm would still rescale by 1/crop_pct and crop)
    if resize == "none":
        raise DataError(f"image {where} is {w}×{h} but the model takes {width}×{height}",
                        hint="choose a resize policy (--resize shorter|plain)")
    if resize == "plain":
        return _resize(img, mask, [height, width])
    check_resize(resize, crop_pct)
    if height == width:
        img, mask = _resize(img, mask, [math.floor(height / crop_pct)])  # one int: the shorter side
    else:
        img, mask = _resize(img, mask, [math.floor(height / crop_pct), math.floor(width / crop_pct)])
    return _centre_crop(img, mask, height, width)


@dataclass(frozen=True)
class Augment:
    """Training augmentations (off unless asked for): a random resized crop back to the same size and a
    horizontal flip, drawn once per item and applied to its image and mask alike.

    `scale`/`ratio` are torchvision's RandomResizedCrop defaults; `flip` is the flip probability.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5

    def params(self, h: int, w: int, gen: torch.Generator) -> tuple[int, int, int, int, bool]:
        """(top, left, crop height, crop width, flip): torchvision's sampling, from `gen` instead of global RNG."""
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        box = None
        for _ in range(10):
            u = torch.rand(2, generator=gen).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
                box = (top, left, ch, cw)
                break
        if box is None:  # torchvision's fallback: the whole image at the nearest allowed ratio, centred
            ratio = w / h
            cw, ch = (w, round(w / self.ratio[0])) if ratio < self.ratio[0] else \
                (round(h * self.ratio[1]), h) if ratio > self.ratio[1] else (w, h)
            ch, cw = min(ch, h), min(cw, w)
            box = ((h - ch) // 2, (w - cw) // 2, ch, cw)
        flip = bool(torch.rand(1, generator=gen) < self.flip)
        return (*box, flip)

    def __call__(self, img: Tensor, mask: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        h, w = img.shape[-2:]
        top, left, ch, cw, flip = self.params(h, w, gen)
        return self.apply(img, mask, top, left, ch, cw, flip)

    @staticmethod
    def apply(img: Tensor, mask: Tensor, top: int, left: int, ch: int, cw: int, flip: bool) -> tuple[Tensor, Tensor]:
        """Crop (top, left, ch, cw), resize back to the input size, flip if asked: image and mask alike."""
        h, w = img.shape[-2:]
        img, mask = _resize(img[..., top:top + ch, left:left + cw], mask[..., top:top + ch, left:left + cw], [h, w])
        if flip:
            img, mask = img.flip(-1), mask.flip(-1)
        return img, mask


def item_generator(seed: int, index: int) -> torch.Generator:
    """The generator of one item's augmentation: a function of (seed, item index) only, so the result does not
    depend on the worker, the batch or the order items are drawn in. Pass seed + epoch for new draws each epoch."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63))
