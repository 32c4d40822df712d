"""Heatmap images without matplotlib: colour ramps, PNG bytes, atomic PNG files.

The two colour maps are zennit's (`zennit.image.CMAPS`), as piecewise-linear ramps over a value v ∈ [−1, 1]:

    bwr       blue (−1) → white (0) → red (+1)
    coldnhot  cyan (−1) → blue (−½) → black (0) → red (⅓) → yellow (⅔) → white (+1)

They are written out here (not taken from zennit's 256-entry palette) so that 0 lands exactly on the neutral colour
(zennit's palette centre sits between two entries) and colouring does not import zennit (about 2 s).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from torch import Tensor

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


def image_png_bytes(x: Tensor, scale: int = 4) -> bytes:
    """PNG of a C×H×W pixel-space image in [0, 1] (clamped): RGB for 3 channels, grayscale otherwise."""
    return png_bytes(to_uint8(x), scale)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file in the same folder, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_png(path: str | os.PathLike, rgb: np.ndarray, scale: int = 4) -> Path:
    """`png_bytes(rgb, scale)` written atomically to `path`."""
    return write_bytes_atomic(path, png_bytes(rgb, scale))
