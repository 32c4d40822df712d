"""Heatmap images without matplotlib: colour ramps, colour bars, artifact outlines, PNG bytes, atomic PNG files.

The two colour maps are zennit's (`zennit.image.CMAPS`), as piecewise-linear ramps over a value v ∈ [−1, 1]:

    bwr       blue (−1) → white (0) → red (+1)
    coldnhot  cyan (−1) → blue (−½) → black (0) → red (⅓) → yellow (⅔) → white (+1)

They are written out here (not taken from zennit's 256-entry palette) so that 0 lands exactly on the neutral colour
(zennit's palette centre sits between two entries) and colouring does not import zennit (about 2 s).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from torch import Tensor

from modelfix.atomic import write_bytes_atomic  # re-exported: cli_explain imports it from here
from modelfix.errors import ModelfixError

# name → (anchor values, RGB at each anchor)
CMAPS: dict[str, tuple[np.ndarray, np.ndarray]] = {
    "bwr": (np.array([-1.0, 0.0, 1.0]),
            np.array([[0, 0, 255], [255, 255, 255], [255, 0, 0]], dtype=np.float64)),
    "coldnhot": (np.array([-1.0, -0.5, 0.0, 1 / 3, 2 / 3, 1.0]),
                 np.array([[0, 255, 255], [0, 0, 255], [0, 0, 0], [255, 0, 0], [255, 255, 0], [255, 255, 255]],
                          dtype=np.float64)),
}


def check_cmap(cmap: str) -> str:
    if cmap not in CMAPS:
        raise ModelfixError(f"unknown colour map '{cmap}'", hint=f"--cmap takes one of: {', '.join(CMAPS)}")
    return cmap


def _ramp(v: np.ndarray, cmap: str) -> np.ndarray:
    """RGB uint8 (…×3) for values v in [−1, 1] (clipped)."""
    anchors, colours = CMAPS[check_cmap(cmap)]
    v = np.clip(v, -1.0, 1.0)
    rgb = np.stack([np.interp(v, anchors, colours[:, c]) for c in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


def colorize(maps: Tensor, cmap: str = "bwr", symmetric: bool = True) -> np.ndarray:
    """N×H×W maps → uint8 N×H×W×3 images, each map scaled on its own.

    symmetric: v = m / max|m|, so 0 is the neutral colour (white for bwr, black for coldnhot) and the sign picks the
    side (positive → red, negative → blue). Otherwise the map's [min, max] is stretched over the whole ramp
    [−1, 1].
    An all-zero (or constant) map is all neutral; NaN/inf count as 0.
    """
    m = np.nan_to_num(maps.detach().double().cpu().numpy(), nan=0.0, posinf=0.0, neginf=0.0)
    if m.ndim != 3:
        raise ValueError(f"maps must be N×H×W, got shape {m.shape}")
    if symmetric:
        scale = np.abs(m).max(axis=(1, 2), keepdims=True)
        v = np.divide(m, scale, out=np.zeros_like(m), where=scale > 0)
    else:
        low, high = m.min(axis=(1, 2), keepdims=True), m.max(axis=(1, 2), keepdims=True)
        span = high - low
        v = np.divide(2 * (m - low), span, out=np.ones_like(m), where=span > 0) - 1
    return _ramp(v, cmap)


def png_bytes(rgb: np.ndarray, scale: int = 4) -> bytes:
    """PNG of a uint8 H×W×3 (or H×W grayscale) image, enlarged `scale` times with nearest-neighbour (so each input
    pixel stays a crisp square)."""
    from PIL import Image

    if scale < 1:
        raise ValueError(f"scale must be at least 1, not {scale}")
    rgb = np.ascontiguousarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim not in (2, 3) or (rgb.ndim == 3 and rgb.shape[2] != 3):
        raise ValueError(f"expected a uint8 H×W×3 or H×W array, got {rgb.dtype} {rgb.shape}")
    image = Image.fromarray(rgb)
    if scale > 1:
        image = image.resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def to_uint8(x: Tensor) -> np.ndarray:
    """A C×H×W pixel-space image in [0, 1] (clamped) as uint8: H×W×3 for 3 channels, H×W (grayscale) otherwise
    (the channel mean)."""
    x = x.detach().float().cpu().clamp(0.0, 1.0)
    if x.dim() != 3:
        raise ValueError(f"expected a C×H×W image, got shape {tuple(x.shape)}")
    image = x.permute(1, 2, 0) if x.shape[0] == 3 else x.mean(dim=0)
    return np.rint(image.numpy() * 255).astype(np.uint8)


# Magenta stands out on white, black, grey and on the digit and tag colours of the built-in scenarios.
OUTLINE = (255, 0, 255)


def outline(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = OUTLINE) -> np.ndarray:
    """A copy of uint8 H×W×3 `rgb` with the 1-pixel ring just outside `mask` (H×W, true = artifact) painted
    `colour`, so an artifact shows even where it has the background's colour (a white tag on white). The ring is
    the 4-neighbour dilation of the mask minus the mask: the artifact's own pixels stay as they are."""
    inside = np.asarray(mask, dtype=bool)
    if inside.shape != rgb.shape[:2]:
        raise ValueError(f"mask {inside.shape} does not match the image {rgb.shape[:2]}")
    grown = inside.copy()
    grown[1:, :] |= inside[:-1, :]
    grown[:-1, :] |= inside[1:, :]
    grown[:, 1:] |= inside[:, :-1]
    grown[:, :-1] |= inside[:, 1:]
    out = rgb.copy()
    out[grown & ~inside] = colour
    return out


def image_png_bytes(x: Tensor, scale: int = 4, mask: Tensor | None = None) -> bytes:
    """PNG of a C×H×W pixel-space image in [0, 1] (clamped): RGB for 3 channels, grayscale otherwise. With a
    `mask` (H×W or 1×H×W, > 0.5 = artifact) the artifact is outlined (`outline`) at display resolution: the image
    is enlarged first, so the ring is one screen pixel wide and covers no image pixel."""
    image = to_uint8(x)
    if mask is None or not bool((mask > 0.5).any()):
        return png_bytes(image, scale)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    inside = (mask.detach().float().cpu().reshape(image.shape[:2]) > 0.5).numpy()
    big_mask = np.repeat(np.repeat(inside, scale, axis=0), scale, axis=1)
    return png_bytes(outline(big, big_mask), 1)


def colorbar(cmap: str = "bwr", width: int = 128, height: int = 8) -> np.ndarray:
    """uint8 height×width×3 colour bar: the ramp from −1 (left) through 0 (the centre column's neutral colour)
    to +1 (right), for the legend under heatmaps (labels are the page's text, so no font is needed here)."""
    if width < 3 or height < 1:
        raise ValueError(f"a colour bar needs width ≥ 3 and height ≥ 1, got {width}×{height}")
    row = _ramp(np.linspace(-1.0, 1.0, width), cmap)
    return np.ascontiguousarray(np.broadcast_to(row, (height, width, 3)))


def colorbar_png(cmap: str = "bwr", width: int = 129, height: int = 8) -> bytes:
    """`colorbar(cmap, width, height)` as PNG bytes (odd width: one column is exactly 0)."""
    return png_bytes(colorbar(cmap, width, height), 1)


def save_png(path: str | os.PathLike, rgb: np.ndarray, scale: int = 4) -> Path:
    """`png_bytes(rgb, scale)` written atomically to `path`."""
    return write_bytes_atomic(path, png_bytes(rgb, scale))
