"""The lazy on-disk source: image files (a class folder or a manifest) read one item at a time, at the model's size.

Nothing is decoded up front but the headers (`check="header"`): a corrupt file, or one above the pixel limit, is
refused (or skipped with `skip_bad=True`) before any work starts. Items are decoded in `DataLoader` workers
(`modelfix.data.stream.batches`), 8-bit images stay uint8 until the batch is on its device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DataError
from .decode import IMAGE_SUFFIXES, MAX_PIXELS, decode, decode_mask, scan
from .manifest import Columns, read_manifest
from .sources import is_saved_layout, natural_classes, subdirs
from .transforms import CROP_PCT, check_resize, fit, to_channels

MASK_SUFFIXES = (".png", ".npy")
CHECKS = ("header", "decode", "none")


@dataclass(frozen=True)
class Item:
    """One image on disk: its file, label index, optional mask file and group index."""

    path: Path
    label: int
    mask: Path | None
    group: int


class ImageSource(torch.utils.data.Dataset):
    """Items read lazily from disk and brought to (channels, height, width) by the `resize` policy.

    `source[i]` is a dict `x` (C×H×W, uint8 for 8-bit files, else float32 in [0, 1]), `y`, `mask` (1×H×W float32,
    1 = spurious), `has_mask`, `group`, `index`; decoding errors come back as an `error` entry (the batch stream
    raises them in the main process as one DataError naming the file). `info` records the source, the resize
    policy, the conversions, the skipped files and the extra masks.
    """

    def __init__(self, items: list[Item], class_names, channels: int, height: int, width: int,
                 resize: str = "shorter", crop_pct: float = CROP_PCT, group_names=None, name: str = "data",
                 info: dict | None = None, max_pixels: int = MAX_PIXELS):
        check_resize(resize, crop_pct)
        if not items:
            raise DataError(f"data '{name}' holds no images")
        if channels not in (1, 3):
            raise DataError(f"data '{name}': the model takes {channels} channels; image files give 1 or 3")
        if height < 1 or width < 1 or height * width > max_pixels:
            raise DataError(f"data '{name}': a target size of {width}×{height} is outside 1 … {max_pixels:,} pixels")
        self.items = list(items)
        self.class_names = [str(c) for c in class_names]
        self.group_names = [str(g) for g in group_names] if group_names is not None else list(self.class_names)
        self.channels, self.height, self.width = int(channels), int(height), int(width)
        self.resize, self.crop_pct, self.max_pixels = resize, float(crop_pct), int(max_pixels)
        self.name = name
        self.info = {**(info or {}), "resize": resize, "crop_pct": self.crop_pct,
                     "files": [str(it.path) for it in self.items]}
        self.y = torch.tensor([it.label for it in self.items], dtype=torch.long)
        self.group = torch.tensor([it.group for it in self.items], dtype=torch.long)
        self.has_mask = torch.tensor([it.mask is not None for it in self.items], dtype=torch.bool)
        self.workers = 0  # DataLoader workers `batches` uses by default (the CLI's --workers)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return (f"ImageSource(name={self.name!r}, n={len(self)}, shape={self.shape}, resize={self.resize!r}, "
                f"classes={self.num_classes}, with_mask={int(self.has_mask.sum())})")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def class_counts(self) -> Tensor:
        return torch.bincount(self.y, minlength=self.num_classes)

    def subset(self, idx) -> ImageSource:
        """The items at `idx` (indices, a bool mask, a slice or a list), still lazy: nothing is read."""
        if isinstance(idx, slice):
            idx = torch.arange(len(self))[idx]
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = torch.nonzero(idx).flatten()
        info = {k: v for k, v in self.info.items() if k not in ("files", "checksum")}
        view = ImageSource([self.items[int(i)] for i in idx.long().flatten()], self.class_names, *self.shape,
                           resize=self.resize, crop_pct=self.crop_pct, group_names=self.group_names, name=self.name,
                           info=info, max_pixels=self.max_pixels)
        view.workers = self.workers
        return view

    def checksum(self) -> str:
        """First 16 hex characters of a sha256 of what decides the pixels without reading them: each item's
        file (path, size, modification time), label, group and mask file, and the transform settings. Cheap on
        20,000 files (one stat each); it differs from the checksum of the same images decoded into a `Dataset`."""
        digest = hashlib.sha256(repr((self.shape, self.resize, self.crop_pct)).encode())
        for it in self.items:
            for path in (it.path, it.mask):
                if path is not None:
                    stat = path.stat()
                    digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            digest.update(f"{it.label}\0{it.group}\n".encode())
        return digest.hexdigest()[:16]

    def load(self, i: int) -> tuple[Tensor, Tensor, str]:
        """Item i's image (C×H×W) and mask (1×H×W) at the model's size, and the channel conversion made."""
        it = self.items[i]
        arr, note = decode(it.path, self.max_pixels)
        img, conversion = to_channels(arr, self.channels, it.path)
        note = f"{note}, {conversion}" if conversion else note
        h, w = img.shape[-2:]
        if it.mask is None:
            mask = None
        else:
            m = decode_mask(it.mask, self.max_pixels)
            if m.shape != (h, w):
                raise DataError(f"mask {it.mask} is {m.shape[1]}×{m.shape[0]} but its image {it.path} is {w}×{h}")
            mask = torch.from_numpy(m)[None]
        img, mask = fit(img, mask, self.height, self.width, self.resize, self.crop_pct, it.path)
        if mask is None:
            mask = torch.zeros(1, self.height, self.width)
        return img, mask, note

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        base = {"y": self.y[i], "has_mask": self.has_mask[i], "group": self.group[i], "index": torch.tensor(i)}
        try:
            img, mask, _ = self.load(i)
        except DataError as exc:  # travels to the main process as data, so it stays one line naming the file
            return {**base, "error": str(exc)}
        return {**base, "x": img, "mask": mask}


# ---- checking files --------------------------------------------------------------------------------------------


def check_items(items: list[Item], check: str = "header", skip_bad: bool = False,
                max_pixels: int = MAX_PIXELS, channels: int | None = None) -> tuple[list[Item], list[str], dict]:
    """Scan every image (and mask) before any work: `header` opens each file's header (size, mode; no decoding),
    `decode` decodes it fully (finds truncated files too), `none` trusts the files.

    Returns the kept items, the bad files ("path: why") and a count per (header mode, channels). A bad file is one
    DataError naming it, unless `skip_bad`, which drops its item and lists it.
    """
    if check not in CHECKS:
        raise DataError(f"check must be one of {', '.join(CHECKS)}, not '{check}'")
    kept, bad, modes = [], [], {}
    for it in items:
        try:
            if check != "none":
                head = scan(it.path, max_pixels)
                modes[(head.mode, head.channels)] = modes.get((head.mode, head.channels), 0) + 1
                if it.mask is not None:
                    scan(it.mask, max_pixels)
                if check == "decode":
                    decode(it.path, max_pixels)
                    if it.mask is not None:
                        decode_mask(it.mask, max_pixels)
        except DataError as exc:
            if not skip_bad:
                raise
            bad.append(str(exc))
            continue
        kept.append(it)
    return kept, bad, modes


# ---- folders and manifests -------------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_index(found: list[str], class_names, where) -> list[str]:
    if class_names is None:
        return natural_classes(sorted(set(found)))
    names = [str(c) for c in class_names]
    for c in found:
        if c not in names:
            raise DataError(f"class '{c}' in {where} is not one of the model's classes",
                            hint=f"classes: {', '.join(names)}")
    return names


def folder_items(root, mask_dir=None, class_names=None) -> tuple[list[Item], list[str], dict]:
    """Items of `root/<class>/<file>` (or the `images/` + `masks/` layout), masks from a mirrored folder
    `mask_dir/<class>/<stem>.png|npy`. Masks without an image are counted in `info["extra_masks"]`, not refused."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    image_root = root
    if is_saved_layout(root):
        image_root = root / "images"
        if mask_dir is None and (root / "masks").is_dir():
            mask_dir = root / "masks"
    folders = subdirs(image_root)
    if not folders:
        raise DataError(f"data folder {image_root} has no class subfolders",
                        hint="put each class's images in its own subfolder: DIR/<class>/<file>")
    names = _class_index([f.name for f in folders], class_names, image_root)
    index_of = {n: i for i, n in enumerate(names)}
    by_name = {f.name: f for f in folders}
    files = [(f, cls) for cls in natural_classes(list(by_name)) for f in _image_files(by_name[cls])]
    if not files:
        raise DataError(f"data folder {image_root} holds no images in its class folders")
    masks: dict[tuple[str, str], Path] = {}
    info = {"source": "folder", "root": str(root)}
    if mask_dir is not None:
        mask_root = Path(mask_dir)
        if not mask_root.is_dir():
            raise DataError(f"mask folder {mask_root} does not exist or is not a folder")
        for mfolder in subdirs(mask_root):
            for m in mfolder.iterdir():
                if m.is_file() and m.suffix.lower() in MASK_SUFFIXES and not m.name.startswith("."):
                    masks[(mfolder.name, m.stem)] = m
        info["mask_dir"] = str(mask_root)
    stems = [(cls, f.stem) for f, cls in files]
    if len(set(stems)) != len(stems) and masks:
        dup = next(s for s in stems if stems.count(s) > 1)
        raise DataError(f"two images share the stem '{dup[1]}' in {image_root / dup[0]}, so their masks are ambiguous")
    items = [Item(f, index_of[cls], masks.get((cls, f.stem)), index_of[cls]) for f, cls in files]
    if mask_dir is not None:
        info["extra_masks"] = len(set(masks) - set(stems))
    return items, names, info


def manifest_items(path, columns: Columns = Columns(),
                   class_names=None) -> tuple[list[Item], list[str], list[str], dict]:
    """Items of a `.csv`/`.tsv` manifest: labels are class names (mapped onto `class_names` when given); groups
    are names too (sorted), the label when the row has none."""
    rows = read_manifest(path, columns)
    names = _class_index([r.label for r in rows], class_names, path)
    index_of = {n: i for i, n in enumerate(names)}
    has_groups = any(r.group is not None for r in rows)
    group_names = natural_classes(sorted({r.group or r.label for r in rows})) if has_groups else list(names)
    group_of = {g: i for i, g in enumerate(group_names)}
    items = []
    for r in rows:
        if not r.path.is_file():
            raise DataError(f"manifest {path} line {r.line}: image {r.path} does not exist")
        if r.mask is not None and not r.mask.is_file():
            raise DataError(f"manifest {path} line {r.line}: mask {r.mask} does not exist")
        group = group_of[r.group or r.label] if has_groups else index_of[r.label]
        items.append(Item(r.path, index_of[r.label], r.mask, group))
    return items, names, group_names, {"source": "manifest", "path": str(path)}


def _counts(modes: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for (mode, _), n in modes.items():
        out[mode] = out.get(mode, 0) + n
    return out


def conversions(modes: dict, channels: int) -> dict[str, int]:
    """The conversions the files will go through, stated for the report: `{"RGBA → RGB": 3, "L → RGB": 2}` (files
    already 8-bit grey for a grey model, or RGB for an RGB one, are not listed)."""
    target = "RGB" if channels == 3 else "grey"
    out: dict[str, int] = {}
    for (mode, have), n in modes.items():
        if (mode, have, channels) in (("L", 1, 1), ("RGB", 3, 3)) or mode == "npy:uint8" and have == channels:
            continue
        note = f"{mode} → {target}" + (" (alpha dropped)" if "A" in mode and not mode.startswith("npy") else "")
        out[note] = out.get(note, 0) + n
    return out


def open_source(spec, channels: int | None = None, height: int | None = None, width: int | None = None,
                resize: str = "shorter", crop_pct: float = CROP_PCT, mask_dir=None, class_names=None,
                columns: Columns = Columns(), check: str = "header", skip_bad: bool = False,
                max_pixels: int = MAX_PIXELS) -> ImageSource:
    """An `ImageSource` for a folder or a `.csv`/`.tsv` manifest, brought to channels × height × width.

    Without a size, the first image's size is the target and `resize` becomes `none` (every image that size);
    without `channels`, the first image's. Files are checked first (`check`, `skip_bad`, `max_pixels`); the
    bad files skipped are listed in `info["skipped"]`.
    """
    path = Path(spec)
    if path.is_dir():
        if columns != Columns():
            raise DataError(f"manifest columns apply to .csv/.tsv manifests, not to the folder {path}")
        items, names, info = folder_items(path, mask_dir, class_names)
        group_names = names
    elif path.suffix.lower() in (".csv", ".tsv"):
        if mask_dir is not None:
            raise DataError(f"--masks applies to image folders; the manifest {path} names masks in a column")
        items, names, group_names, info = manifest_items(path, columns, class_names)
    else:
        raise DataError(f"data {path} is neither a folder nor a .csv/.tsv manifest")
    n_listed = len(items)
    items, bad, modes = check_items(items, check, skip_bad, max_pixels)
    if not items:
        raise DataError(f"data {path}: all {n_listed} images are unreadable", hint=bad[0] if bad else None)
    if channels is None or height is None or width is None:
        head = scan(items[0].path, max_pixels)
        channels = channels or head.channels
        if height is None or width is None:
            height, width, resize = head.height, head.width, "none"
    info = {**info, "skipped": bad, "modes": _counts(modes), "conversions": conversions(modes, channels)}
    return ImageSource(items, names, channels, height, width, resize=resize, crop_pct=crop_pct,
                       group_names=group_names, name=path.stem if path.is_file() else (path.name or str(path)),
                       info=info, max_pixels=max_pixels)
