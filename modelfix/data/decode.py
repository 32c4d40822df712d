"""One image file, read safely: a header scan (size and mode, no pixels decoded) and a full decode to channels.

Every failure is a `DataError` naming the file: unreadable or corrupt files (including the `SyntaxError` some
Pillow plugins raise on broken chunks), and images above the pixel limit, which are refused from the header so a
decompression bomb is never decoded.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".npy")
MAX_PIXELS = 2**28  # ~268 M pixels (16384²): larger headers are refused before any decoding
# Everything a broken file makes Pillow or NumPy raise; Pillow's PNG plugin raises SyntaxError on bad chunks.
READ_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
               Image.DecompressionBombError, IndexError, TypeError)


@dataclass(frozen=True)
class Header:
    """What a header says: height, width, channels and the mode ('L', 'RGB', 'P', 'I;16', 'npy:uint8', …)."""

    height: int
    width: int
    channels: int
    mode: str


def _pil_channels(img: Image.Image) -> int:
    """Channels after modelfix's conversion: grey modes 1, everything else 3 (alpha is dropped)."""
    if img.mode in ("1", "L", "LA", "I", "F") or img.mode.startswith("I;16"):
        return 1
    if img.mode in ("P", "PA"):
        return 3 if img.palette is None or img.palette.mode.startswith("RGB") else 1
    return 3


def _too_big(path: Path, h: int, w: int, max_pixels: int) -> None:
    if h * w > max_pixels:
        raise DataError(f"image {path} is {w}×{h} = {h * w:,} pixels, above the limit of {max_pixels:,}",
                        hint="a possible decompression bomb; raise max_pixels (--max-pixels) if the image is genuine")


def _npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except READ_ERRORS as exc:
        raise DataError(f"cannot read array {path}: {exc}") from None
    return shape, dtype


def _channels_first(shape: tuple[int, ...]) -> bool:
    """C×H×W rather than H×W×C: a leading 1/3/4 wins unless the last axis is also a channel count and smaller."""
    return shape[0] in (1, 3, 4) and (shape[2] not in (1, 3, 4) or shape[0] <= shape[2])


def _npy_hw(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """(H, W, C) of an array shaped H×W, H×W×C or C×H×W (C in 1, 3, 4; a 4th channel is alpha)."""
    if len(shape) == 2:
        return shape[0], shape[1], 1
    if len(shape) == 3:
        if _channels_first(shape):
            return shape[1], shape[2], min(shape[0], 3)
        if shape[2] in (1, 3, 4):
            return shape[0], shape[1], min(shape[2], 3)
    raise DataError(f"image {path} has shape {shape}; expected H×W, H×W×C or C×H×W with 1, 3 or 4 channels")


def open_image(path: Path) -> Image.Image:
    """`Image.open` (lazy: reads the header only) with every failure, the decompression-bomb error included, as a
    DataError naming the file. Pillow's own bomb warning is silenced: modelfix applies its own `max_pixels`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise DataError(f"image {path} is refused as a decompression bomb: {exc}",
                        hint="raise PIL.Image.MAX_IMAGE_PIXELS if the image is genuine") from None
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except READ_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


def scan(path, max_pixels: int = MAX_PIXELS) -> Header:
    """The header of one image file, without decoding its pixels; a file above `max_pixels` is refused here."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        shape, dtype = _npy_shape(path)
        h, w, c = _npy_hw(shape, path)
        _too_big(path, h, w, max_pixels)
        return Header(h, w, c, f"npy:{dtype}")
    with open_image(path) as img:
        w, h = img.size
        _too_big(path, h, w, max_pixels)
        return Header(h, w, _pil_channels(img), img.mode)


def _hwc(arr: np.ndarray, path: Path) -> np.ndarray:
    """An array as H×W×C, alpha dropped."""
    if arr.ndim == 2:
        return arr[:, :, None]
    _npy_hw(arr.shape, path)  # refuses shapes that are no image
    hwc = arr.transpose(1, 2, 0) if _channels_first(arr.shape) else arr
    return hwc[:, :, :3]


def load_npy(path: Path, max_pixels: int, what: str) -> np.ndarray:
    """A `.npy` image or mask as H×W×C, its size checked from the header first; never unpickled."""
    scan(path, max_pixels)
    try:
        arr = np.load(path, allow_pickle=False)
    except READ_ERRORS as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from None
    return _hwc(arr, path)


def decode(path, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, str]:
    """One file as an H×W×C array (C = 1 or 3) and a note of the conversion made.

    8-bit images stay uint8 (÷ 255 happens when batched); 16-bit PNG/TIFF become float32 ÷ 65535; 32-bit
    integer/float images and float `.npy` arrays are float32 as stored; palette images are expanded to RGB (or
    grey for a grey palette); alpha is dropped; CMYK/YCbCr/LAB become RGB.
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        arr = load_npy(path, max_pixels, "array")
        if arr.dtype == np.uint8:
            return np.ascontiguousarray(arr), "npy uint8"
        if arr.dtype == np.uint16:
            return (arr.astype(np.float32) / np.float32(65535)), "npy uint16 ÷ 65535"
        if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.floating):
            return arr.astype(np.float32), f"npy {arr.dtype} kept"
        raise DataError(f"image {path} has dtype {arr.dtype}; expected uint8, uint16, bool or float")
    with open_image(path) as img:
        w, h = img.size
        _too_big(path, h, w, max_pixels)
        mode = img.mode
        try:
            img.load()
            if mode.startswith("I;16") or mode == "I":
                scale = np.float32(65535)
                return (np.asarray(img).astype(np.float32) / scale)[:, :, None], f"{mode} ÷ 65535"
            if mode == "F":
                return np.asarray(img, dtype=np.float32)[:, :, None], "F kept"
            if mode in ("1", "L", "LA"):
                return np.asarray(img.convert("L"))[:, :, None], mode if mode == "L" else f"{mode} → L"
            if mode in ("P", "PA") and _pil_channels(img) == 1:
                return np.asarray(img.convert("L"))[:, :, None], f"{mode} (grey palette) → L"
            note = "RGB" if mode == "RGB" else f"{mode} → RGB"
            return np.asarray(img.convert("RGB")), note
        except READ_ERRORS as exc:
            raise DataError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None


def decode_mask(path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One mask file as float32 H×W: nonzero (in any channel) = spurious = 1."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        arr = load_npy(path, max_pixels, "mask")
    else:
        with open_image(path) as img:
            w, h = img.size
            _too_big(path, h, w, max_pixels)
            try:
                # alpha is no part of a mask (an opaque RGBA mask would be all ones); palettes by colour
                mode = {"P": "L", "PA": "L", "LA": "L", "RGBA": "RGB", "RGBa": "RGB"}.get(img.mode)
                arr = np.asarray(img.convert(mode) if mode else img)
            except READ_ERRORS as exc:
                raise DataError(f"cannot decode mask {path}: {type(exc).__name__}: {exc}") from None
    if arr.ndim == 3:
        arr = arr.any(axis=2)
    return (arr != 0).astype(np.float32)
