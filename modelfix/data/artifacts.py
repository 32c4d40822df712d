"""Spurious signals: small objects that paste themselves onto a batch of images and return where they went.

Each kind has a canonical text spec (`str(artifact)`, which `parse_artifact` reads back to an equal object) and
a dict/YAML form (`to_dict()`); both parse to the same object:

    corner-patch                       corner-patch,size=4,corners=tl+br
    pixels:egem                        pixels:1:2/2:1/2:2,value=1,target=8
    image:tag.png@bottom-right         image:tag.png@3:20,alpha=0.5
    stripe@right                       stripe@5,width=3,value=0.5,target=1

    {kind: image, path: tag.png, position: bottom-right, alpha: 0.8}
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..errors import ArtifactSpecError, DataError
from .decode import scan

CORNERS = ("tl", "tr", "bl", "br")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center", "top", "bottom", "left", "right")
STRIPE_COLUMNS = ("left", "center", "right")
EGEM_PIXELS = ((1, 2), (2, 1), (2, 2))
TAG_PIXELS = tuple((r, c) for r in range(4) for c in range(4))  # a 4×4 square in the top-left corner
PIXEL_PRESETS = {"egem": EGEM_PIXELS, "tag": TAG_PIXELS}
EXAMPLES = "corner-patch, pixels:egem, image:tag.png@bottom-right, stripe@right,width=2"


def _num(v: float) -> str:
    """A number as short text that parses back to the same float: 1.0 → '1', 0.25 → '0.25'."""
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _check_batch(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise DataError(f"an artifact is applied to a float batch N×C×H×W, got {shape}")


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(0)


class Artifact(ABC):
    """A spurious signal. `apply(x, colour_labels, generator) -> (x', mask)` pastes it on a batch (never in place)
    and returns its footprint, float32 n×1×H×W with 1 where the artifact went.

    `label_coloured` kinds encode a class in the artifact (`colour_labels`, one per image; None = a fixed
    colour); the others carry a `target`, the class the artifact is correlated with in training data (or None).
    """

    kind: ClassVar[str]
    label_coloured: ClassVar[bool] = False
    target: int | None = None

    @abstractmethod
    def apply(self, x: Tensor, colour_labels: Tensor | None = None,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Paste onto a copy of `x` (n×C×H×W, pixel space); return `(x', mask[n,1,H,W])`."""

    def paste_(self, x: Tensor, colour_labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Paste *in place* onto `x` and return the footprint as bool n×1×H×W: the same pixels, random draws and
        footprint as `apply`. Kinds that know their footprint override this to write those pixels only (poisoning
        20,000 MNIST images through `apply` cost as much as predicting them)."""
        x_new, mask = self.apply(x, colour_labels, generator)
        x.copy_(x_new)
        return mask.bool()

    def draw(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """The random draws `paste_` makes for a call on `n` items, one row per item (none for kinds that draw
        nothing). A kind that draws overrides this and `paste_drawn_`, so a streamed source can draw a whole chunk
        at once and paste it batch by batch: the same draws and pixels as one `paste_` on the chunk."""
        return ()

    def paste_drawn_(self, x: Tensor, colour_labels: Tensor | None, drawn: tuple[Tensor, ...]) -> Tensor:
        """`paste_` with the draws given (rows of `draw`'s result for these items)."""
        return self.paste_(x, colour_labels, None)

    def to_dict(self) -> dict:
        """The YAML/dict form: `kind` plus every field."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return out

    def _options(self, skip: tuple[str, ...] = ()) -> str:
        """`,key=value` for every field that differs from its default (the canonical text form)."""
        parts = []
        for f in dataclasses.fields(self):
            if f.name in skip:
                continue
            value = getattr(self, f.name)
            if value == f.default:
                continue
            text = "none" if value is None else _num(value) if isinstance(value, float) else str(value)
            parts.append(f",{f.name}={text}")
        return "".join(parts)

    @abstractmethod
    def __str__(self) -> str:
        """The canonical text spec."""


# ---- corner patch (DecoyMNIST) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CornerPatch(Artifact):
    """A size×size square in a random corner, coloured by label (Ross et al.'s DecoyMNIST, as in TAP and R4).

    The corner comes from two independent fair coins per image (rows 0..size-1 or H-size..H-1, same for the
    columns), or uniformly from the listed `corners`. Grey level (255 − 25·label)/255 on every channel for up to 10
    classes (label 0 → 255, label 9 → 30); for more classes the levels are spread evenly from 255 down to 30.
    Without colour labels the patch has `fixed_level`.
    """

    kind: ClassVar[str] = "corner-patch"
    label_coloured: ClassVar[bool] = True

    size: int = 4
    corners: str = "all"
    num_classes: int = 10
    fixed_level: float = 0.5

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "size", _as_int(self.size, "size", self))
        set_(self, "num_classes", _as_int(self.num_classes, "num_classes", self))
        set_(self, "fixed_level", _as_float(self.fixed_level, "fixed_level", self))
        if self.size < 1:
            raise ArtifactSpecError(f"corner-patch size must be at least 1, got {self.size}")
        if self.num_classes < 1:
            raise ArtifactSpecError(f"corner-patch num_classes must be at least 1, got {self.num_classes}")
        set_(self, "corners", _canonical_corners(self.corners))

    def levels(self) -> Tensor:
        """Grey level per class, float32 K: (255 − 25·k)/255 for K ≤ 10, else evenly spread from 255 to 30."""
        k = torch.arange(self.num_classes, dtype=torch.float64)
        if self.num_classes <= 10:
            byte = 255 - 25 * k
        else:
            byte = torch.round(255 - 225 * k / (self.num_classes - 1))
        return (byte / 255).float()

    def draw(self, n, generator=None):
        """(bottom, right) corner coins per image, drawn from `generator` in the order `apply` always used."""
        gen = _default_generator(generator)
        if self.corners == "all":
            bottom = torch.randint(0, 2, (n,), generator=gen).bool()
            right = torch.randint(0, 2, (n,), generator=gen).bool()
            return bottom, right
        chosen = self.corners.split("+")
        pick = torch.randint(0, len(chosen), (n,), generator=gen)
        return torch.tensor([c[0] == "b" for c in chosen])[pick], torch.tensor([c[1] == "r" for c in chosen])[pick]

    def _placement(self, x, colour_labels, generator, drawn=None) -> tuple[Tensor, Tensor, Tensor]:
        """(top row, left column, grey level) per image, from `drawn` (see `draw`) or drawn from `generator`."""
        _check_batch(x)
        n, _, h, w = x.shape
        s = self.size
        if s > h or s > w:
            raise DataError(f"corner-patch size {s} does not fit images of {h}×{w}")
        bottom, right = self.draw(n, generator) if drawn is None else drawn
        if colour_labels is None:
            level = torch.full((n,), self.fixed_level)
        else:
            colour_labels = torch.as_tensor(colour_labels).long()
            if colour_labels.shape != (n,):
                raise DataError(f"corner-patch needs one colour label per image ({n}), "
                                f"got {tuple(colour_labels.shape)}")
            if n and (int(colour_labels.min()) < 0 or int(colour_labels.max()) >= self.num_classes):
                raise DataError(f"corner-patch encodes {self.num_classes} classes but got label "
                                f"{int(colour_labels.max())}", hint="set num_classes= in the artifact spec")
            level = self.levels()[colour_labels]
        return torch.where(bottom, h - s, 0), torch.where(right, w - s, 0), level

    def apply(self, x, colour_labels=None, generator=None):
        row0, col0, level = self._placement(x, colour_labels, generator)
        n, _, h, w = x.shape
        s = self.size
        rows = torch.arange(h)
        cols = torch.arange(w)
        in_rows = (rows[None] >= row0[:, None]) & (rows[None] < row0[:, None] + s)
        in_cols = (cols[None] >= col0[:, None]) & (cols[None] < col0[:, None] + s)
        mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
        x_new = torch.where(mask, level.to(x.dtype).view(n, 1, 1, 1), x)
        return x_new, mask.float()

    def paste_(self, x, colour_labels=None, generator=None):
        return self.paste_drawn_(x, colour_labels, None, generator)

    def paste_drawn_(self, x, colour_labels, drawn, generator=None):
        row0, col0, level = self._placement(x, colour_labels, generator, drawn)
        n, _, h, w = x.shape
        s = self.size
        mask = torch.zeros(n, 1, h, w, dtype=torch.bool)
        level = level.to(x.dtype)
        for r in (0, h - s):  # the four corners: one strided write each
            for c in (0, w - s):
                sel = ((row0 == r) & (col0 == c)).nonzero().squeeze(1)
                x[sel, :, r:r + s, c:c + s] = level[sel].view(-1, 1, 1, 1)
                mask[sel, :, r:r + s, c:c + s] = True
        return mask

    def __str__(self) -> str:
        return "corner-patch" + self._options()


def _canonical_corners(corners) -> str:
    if isinstance(corners, (list, tuple)):
        items = [str(c).strip().lower() for c in corners]
    else:
        text = str(corners).strip().lower()
        if text == "all":
            return "all"
        items = [c.strip() for c in re.split(r"[+ ]", text) if c.strip()]
    bad = [c for c in items if c not in CORNERS]
    if bad or not items:
        raise ArtifactSpecError(f"corner-patch corners '{corners}' must be 'all' or a '+'-joined subset of "
                                f"{', '.join(CORNERS)} (e.g. tl+br)")
    chosen = [c for c in CORNERS if c in items]
    return "all" if len(chosen) == 4 else "+".join(chosen)


# ---- fixed pixels (EGEM MNIST) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedPixels(Artifact):
    """A few pixels set to `value` on every channel: the EGEM modified-MNIST artifact, (1,2), (2,1), (2,2) = 1.0,
    correlated with class 8 (`target`). Presets: `egem` (those three pixels), `tag` (a 4×4 square in the top-left
    corner, the `tagged-digits` scenario's tag)."""

    kind: ClassVar[str] = "pixels"

    pixels: tuple = EGEM_PIXELS
    value: float = 1.0
    target: int | None = 8

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "pixels", _canonical_pixels(self.pixels))
        set_(self, "value", _as_float(self.value, "value", self))
        set_(self, "target", _as_target(self.target, self))

    def footprint(self, x) -> torch.Tensor:
        """The bool N×1×H×W mask of the pixels, each checked to lie inside the images."""
        _check_batch(x)
        n, _, h, w = x.shape
        mask = torch.zeros(n, 1, h, w, dtype=torch.bool)
        for r, c in self.pixels:
            if r >= h or c >= w:
                raise DataError(f"pixel ({r}, {c}) of '{self}' lies outside images of {h}×{w}")
            mask[:, :, r, c] = True
        return mask

    def apply(self, x, colour_labels=None, generator=None):
        mask = self.footprint(x)
        x_new = torch.where(mask, torch.tensor(self.value, dtype=x.dtype), x)
        return x_new, mask.float()

    def paste_(self, x, colour_labels=None, generator=None):
        mask = self.footprint(x)
        x.masked_fill_(mask, self.value)  # the mask broadcasts over the channels
        return mask

    def __str__(self) -> str:
        presets = {pixels: name for name, pixels in PIXEL_PRESETS.items()}
        where = presets.get(self.pixels) or "/".join(f"{r}:{c}" for r, c in self.pixels)
        return f"pixels:{where}" + self._options(skip=("pixels",))


def _canonical_pixels(pixels) -> tuple:
    """Pixels as a sorted tuple of (row, col) int pairs; 'egem' and 'tag' are presets; text 'r:c/r:c'."""
    if isinstance(pixels, str):
        text = pixels.strip().lower()
        if text in PIXEL_PRESETS:
            return PIXEL_PRESETS[text]
        try:
            pixels = [tuple(int(v) for v in p.split(":")) for p in text.split("/") if p]
        except ValueError:
            pixels = None
    try:
        out = tuple(sorted({(int(r), int(c)) for r, c in pixels}))
        if not out or any(len(p) != 2 or min(p) < 0 for p in out):
            raise ValueError
    except (TypeError, ValueError):
        raise ArtifactSpecError(f"pixels '{pixels}' must be a preset (egem, tag) or ROW:COL pairs joined by '/', "
                                "e.g. 1:2/2:1/2:2; rows and columns count from 0") from None
    return out


# ---- pasted image (tag, watermark, frame) ----------------------------------------------------------------------


MAX_PASTE_PIXELS = 4096 * 4096  # a tag or watermark; anything larger is a mistake or a bomb


@functools.lru_cache(maxsize=16)
def _read_paste(path: str, mtime: float) -> tuple[np.ndarray, np.ndarray]:
    """An image file as (colour C×h×w float32 in [0,1] with C = 1 or 3, alpha h×w in [0,1])."""
    try:
        scan(path, max_pixels=MAX_PASTE_PIXELS)  # the header first: a decompression bomb is refused before decoding
    except DataError as exc:
        raise ArtifactSpecError(f"artifact {exc}") from None
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode == "P":
                img = img.convert("RGBA")
                mode = "RGBA"
            if mode in ("1", "L", "LA", "I", "I;16", "F"):
                la = np.array(img.convert("LA"), dtype=np.float32) / 255
                return la[None, :, :, 0], la[:, :, 1] if mode == "LA" else np.ones(la.shape[:2], np.float32)
            rgba = np.array(img.convert("RGBA"), dtype=np.float32) / 255
            alpha = rgba[:, :, 3] if mode in ("RGBA", "LA", "PA") else np.ones(rgba.shape[:2], np.float32)
            return rgba[:, :, :3].transpose(2, 0, 1).copy(), alpha
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ArtifactSpecError(f"cannot read artifact image {path}: {exc}") from None


@dataclass(frozen=True)
class ImagePaste(Artifact):
    """An image file (a tag, watermark or frame) alpha-blended onto each image at a fixed position.

    The blend weight is the file's own alpha channel × `alpha`; the mask is where that weight is above zero.
    `scale` resizes the pasted image to `scale` × the target width (aspect kept); `margin` keeps it off the
    edges for named positions. A grey image on RGB data is replicated; an RGB image on grey data becomes its
    luminance (ITU-R 601, as PIL's 'L').
    """

    kind: ClassVar[str] = "image"

    path: str = ""
    position: Any = "bottom-right"
    alpha: float = 1.0
    scale: float | None = None
    margin: int = 0
    target: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "path", str(self.path))
        set_(self, "position", _canonical_position(self.position))
        set_(self, "alpha", _as_float(self.alpha, "alpha", self))
        set_(self, "margin", _as_int(self.margin, "margin", self))
        set_(self, "target", _as_target(self.target, self))
        if self.scale is not None:
            set_(self, "scale", _as_float(self.scale, "scale", self))
            if not self.scale > 0:
                raise ArtifactSpecError(f"image scale must be positive, got {self.scale}")
        if not 0 <= self.alpha <= 1:
            raise ArtifactSpecError(f"image alpha must lie in [0, 1], got {self.alpha}")
        if self.margin < 0:
            raise ArtifactSpecError(f"image margin must be at least 0, got {self.margin}")
        if not self.path:
            raise ArtifactSpecError("an image artifact needs a path, e.g. image:tag.png@bottom-right")
        self.read()  # fail early, naming the file

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """The pasted image's (colour C×h×w, alpha h×w), cached while the file is unchanged."""
        p = Path(self.path)
        if p.is_dir():
            raise ArtifactSpecError(f"artifact image {self.path} is a folder", hint="name an image file (.png, .jpg)")
        if not p.is_file():
            raise ArtifactSpecError(f"artifact image {self.path} does not exist")
        return _read_paste(str(p), p.stat().st_mtime)

    def _patch(self, h: int, w: int, channels: int) -> tuple[Tensor, Tensor]:
        colour, alpha = (torch.from_numpy(a) for a in self.read())
        if self.scale is not None:
            new_w = max(1, round(self.scale * w))
            new_h = max(1, round(colour.shape[1] * new_w / colour.shape[2]))
            both = torch.cat([colour, alpha[None]])[None]
            both = F.interpolate(both, size=(new_h, new_w), mode="bilinear", align_corners=False,
                                 antialias=new_w < colour.shape[2]).clamp(0, 1)[0]
            colour, alpha = both[:-1], both[-1]
        if colour.shape[0] == 3 and channels != 3:
            if channels != 1:
                raise DataError(f"artifact image {self.path} is RGB but the data has {channels} channels")
            colour = (0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2])[None]
        elif colour.shape[0] == 1 and channels != 1:
            colour = colour.expand(channels, -1, -1)
        return colour, alpha * self.alpha

    def _origin(self, h: int, w: int, ph: int, pw: int) -> tuple[int, int]:
        if ph > h or pw > w:
            raise DataError(f"artifact image {self.path} is {ph}×{pw}, larger than the {h}×{w} images",
                            hint="use a smaller image or scale=")
        m = self.margin
        pos = self.position
        if isinstance(pos, tuple):
            r, c = pos
        else:
            vert = "top" if pos.startswith("top") else "bottom" if pos.startswith("bottom") else "middle"
            horiz = "left" if pos.endswith("left") else "right" if pos.endswith("right") else "middle"
            r = {"top": m, "bottom": h - ph - m, "middle": (h - ph) // 2}[vert]
            c = {"left": m, "right": w - pw - m, "middle": (w - pw) // 2}[horiz]
        if r < 0 or c < 0 or r + ph > h or c + pw > w:
            raise DataError(f"artifact image {self.path} ({ph}×{pw}) at {self.position} (margin {m}) does not fit "
                            f"inside {h}×{w} images")
        return r, c

    def apply(self, x, colour_labels=None, generator=None):
        _check_batch(x)
        n, ch, h, w = x.shape
        colour, weight = self._patch(h, w, ch)
        ph, pw = weight.shape
        r, c = self._origin(h, w, ph, pw)
        colour, weight = colour.to(x.dtype), weight.to(x.dtype)
        x_new = x.clone()
        region = x_new[:, :, r:r + ph, c:c + pw]
        x_new[:, :, r:r + ph, c:c + pw] = (1 - weight) * region + weight * colour
        mask = torch.zeros(n, 1, h, w)
        mask[:, 0, r:r + ph, c:c + pw] = (weight > 0).float()
        return x_new, mask

    def __str__(self) -> str:
        pos = self.position if isinstance(self.position, str) else f"{self.position[0]}:{self.position[1]}"
        return f"image:{self.path}@{pos}" + self._options(skip=("path", "position"))


def _canonical_position(position) -> str | tuple[int, int]:
    """A named position, or (row, col) of the pasted image's top-left pixel (from 'ROW:COL' or a pair)."""
    if isinstance(position, (list, tuple)):
        items = list(position)
    else:
        text = str(position).strip().lower()
        if text in POSITIONS:
            return text
        items = text.split(":")
    try:
        if len(items) != 2:
            raise ValueError
        row, col = (int(v) for v in items)
        if row < 0 or col < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise ArtifactSpecError(f"image position '{position}' must be one of {', '.join(POSITIONS)} or ROW:COL "
                                "(the top-left pixel of the pasted image, from 0)") from None
    return (row, col)


# ---- stripe ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stripe(Artifact):
    """A vertical stripe `width` columns wide set to `value` on every channel, at the left, center or right edge
    or starting at a column index."""

    kind: ClassVar[str] = "stripe"

    column: Any = "right"
    width: int = 2
    value: float = 1.0
    target: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        col = self.column
        text = str(col).strip().lower()
        if text in STRIPE_COLUMNS:
            col = text
        else:
            try:
                col = int(text)
                if col < 0:
                    raise ValueError
            except ValueError:
                raise ArtifactSpecError(f"stripe column '{self.column}' must be left, center, right or a column "
                                        "index from 0") from None
        set_(self, "column", col)
        set_(self, "width", _as_int(self.width, "width", self))
        set_(self, "value", _as_float(self.value, "value", self))
        set_(self, "target", _as_target(self.target, self))
        if self.width < 1:
            raise ArtifactSpecError(f"stripe width must be at least 1, got {self.width}")

    def apply(self, x, colour_labels=None, generator=None):
        _check_batch(x)
        n, _, h, w = x.shape
        if isinstance(self.column, int):
            c0 = self.column
        else:
            c0 = {"left": 0, "center": (w - self.width) // 2, "right": w - self.width}[self.column]
        if c0 < 0 or c0 + self.width > w:
            raise DataError(f"stripe '{self}' does not fit inside images {w} pixels wide")
        mask = torch.zeros(n, 1, h, w, dtype=torch.bool)
        mask[:, :, :, c0:c0 + self.width] = True
        x_new = torch.where(mask, torch.tensor(self.value, dtype=x.dtype), x)
        return x_new, mask.float()

    def __str__(self) -> str:
        return f"stripe@{self.column}" + self._options(skip=("column",))


# ---- parsing ---------------------------------------------------------------------------------------------------

KINDS: dict[str, type[Artifact]] = {cls.kind: cls for cls in (CornerPatch, FixedPixels, ImagePaste, Stripe)}


def _as_int(value, name: str, owner) -> int:
    try:
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError
        return int(float(value))
    except (TypeError, ValueError):
        raise ArtifactSpecError(f"{owner.kind} option {name}={value!r} must be an integer") from None


def _as_float(value, name: str, owner) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        out = float(value)
        if not math.isfinite(out):
            raise ValueError
        return out
    except (TypeError, ValueError):
        raise ArtifactSpecError(f"{owner.kind} option {name}={value!r} must be a number") from None


def _as_target(value, owner) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    out = _as_int(value, "target", owner)
    if out < 0:
        raise ArtifactSpecError(f"{owner.kind} target must be a class index from 0 or none, got {out}")
    return out


def _build(kind: str, fields: dict, spec) -> Artifact:
    """Construct a kind from its fields, naming the spec and the valid options on any mistake."""
    cls = KINDS.get(kind)
    if cls is None:
        raise ArtifactSpecError(f"artifact spec '{spec}': unknown kind '{kind}'",
                                hint=f"valid kinds: {', '.join(KINDS)}; e.g. {EXAMPLES}")
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in fields:
        if key not in valid:
            raise ArtifactSpecError(f"artifact spec '{spec}': {kind} has no option '{key}'",
                                    hint=f"{kind} options: {', '.join(valid)}")
    values = {k: (None if isinstance(v, str) and v.strip().lower() == "none" and k in ("scale", "target") else v)
              for k, v in fields.items()}
    try:
        return cls(**values)
    except ArtifactSpecError as exc:
        if f"'{spec}'" in exc.message:
            raise
        raise ArtifactSpecError(f"artifact spec '{spec}': {exc.message}", hint=exc.hint) from None


def _parse_text(spec: str) -> Artifact:
    text = spec.strip()
    match = re.match(r"[A-Za-z][A-Za-z0-9_-]*", text)
    if not match:
        raise ArtifactSpecError(f"artifact spec '{spec}' does not start with a kind",
                                hint=f"valid kinds: {', '.join(KINDS)}; e.g. {EXAMPLES}")
    kind = match.group(0).lower()
    rest = text[match.end():]
    head, *opts = rest.split(",")
    fields: dict[str, Any] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or not key.strip():
            raise ArtifactSpecError(f"artifact spec '{spec}': option '{opt}' must be KEY=VALUE")
        fields[key.strip().lower()] = value.strip()
    arg = None
    if head.startswith(":"):
        arg = head[1:]
    elif head.startswith("@"):
        arg = head
    elif head:
        raise ArtifactSpecError(f"artifact spec '{spec}': unexpected '{head}' after the kind '{kind}'",
                                hint=f"e.g. {EXAMPLES}")
    if kind == "image":
        if not arg or arg.startswith("@"):
            raise ArtifactSpecError(f"artifact spec '{spec}': an image artifact needs a file, e.g. "
                                    "image:tag.png@bottom-right")
        path, at, pos = arg.rpartition("@")
        if at:
            fields["path"], fields["position"] = path, pos
        else:
            fields["path"] = arg
    elif kind == "pixels":
        if arg is None or arg.startswith("@"):
            raise ArtifactSpecError(f"artifact spec '{spec}': pixels needs a list, e.g. pixels:egem or "
                                    "pixels:1:2/2:1/2:2")
        fields["pixels"] = arg
    elif kind == "stripe":
        if arg is not None:
            if not arg.startswith("@"):
                raise ArtifactSpecError(f"artifact spec '{spec}': a stripe's column follows '@', e.g. stripe@right")
            fields["column"] = arg[1:]
    elif arg is not None and kind in KINDS:
        raise ArtifactSpecError(f"artifact spec '{spec}': {kind} takes no argument, only options, "
                                f"e.g. {kind},size=4")
    return _build(kind, fields, spec)


def _from_dict(spec: dict, where=None, base_dir: Path | None = None) -> Artifact:
    shown = where or spec
    if "artifact" in spec and len(spec) == 1:
        inner = spec["artifact"]
        return parse_artifact(inner) if isinstance(inner, str) else _from_dict(inner, where, base_dir)
    if "kind" not in spec:
        raise ArtifactSpecError(f"artifact spec {shown} has no 'kind'",
                                hint=f"valid kinds: {', '.join(KINDS)}; e.g. {{kind: image, path: tag.png}}")
    fields = {str(k).lower(): v for k, v in spec.items() if k != "kind"}
    kind = str(spec["kind"]).strip().lower()
    if kind == "image" and base_dir is not None and "path" in fields and not Path(str(fields["path"])).is_absolute():
        fields["path"] = str(base_dir / str(fields["path"]))
    return _build(kind, fields, shown)


def parse_artifact(spec) -> Artifact:
    """An `Artifact` from a text spec, a dict (the YAML form), or the path of a .yaml/.yml file holding that dict.

    In a YAML file a relative image path is taken relative to the file's folder.
    """
    if isinstance(spec, Artifact):
        return spec
    if isinstance(spec, dict):
        return _from_dict(spec)
    if isinstance(spec, Path) or (isinstance(spec, str) and spec.strip().lower().endswith((".yaml", ".yml"))):
        path = Path(spec)
        try:
            content = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ArtifactSpecError(f"artifact file {path} does not exist") from None
        except (OSError, yaml.YAMLError) as exc:
            raise ArtifactSpecError(f"artifact file {path} is not readable YAML: {exc}") from None
        if isinstance(content, str):
            return parse_artifact(content)
        if not isinstance(content, dict):
            raise ArtifactSpecError(f"artifact file {path} must hold a mapping such as "
                                    "{kind: corner-patch, size: 4}")
        return _from_dict(content, where=str(path), base_dir=path.parent)
    if not isinstance(spec, str):
        raise ArtifactSpecError(f"artifact spec {spec!r} must be text, a dict or a YAML file")
    return _parse_text(spec)
