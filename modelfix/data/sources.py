"""Where datasets come from and go to: MNIST idx files, image folders (with mask folders), tensor bundles.

Every reader turns bad input into a `DataError` that names the file, folder, class or key at fault.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import safe_json
from ..atomic import staged_folder, write_bytes_atomic
from ..errors import DataError
from .dataset import PER_ITEM_INFO, Dataset
from .decode import READ_ERRORS, open_image, scan

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
MASK_SUFFIXES = (".png", ".npy")
IDX_MAGIC = {2049: "labels", 2051: "images"}
FOLDER_FORMAT = "modelfix.dataset/v1"

# ---- MNIST idx -------------------------------------------------------------------------------------------------


def read_idx(path) -> np.ndarray:
    """Read an MNIST idx file (gzip-compressed or raw) into a uint8 array: (N, rows, cols) images or (N,) labels.

    The header is big-endian: magic 2051 (images, 3 dims) or 2049 (labels, 1 dim), then one uint32 per dim. The
    payload must hold exactly the product of the dims in bytes, so a truncated or padded file is refused.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"idx file {path} does not exist") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"idx file {path} is not readable: {exc}") from None
    if len(raw) < 8:
        raise DataError(f"idx file {path} is too short ({len(raw)} bytes) to hold an idx header")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in IDX_MAGIC:
        raise DataError(f"idx file {path} has magic {magic}, expected 2051 (images) or 2049 (labels)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"idx file {path} is too short ({len(raw)} bytes) for its {ndim}-dimension header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(raw) - header
    if payload != expected:
        raise DataError(f"idx file {path} has {payload} bytes of data but its header {dims} needs {expected}",
                        hint="the file is truncated or corrupt; fetch it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable, owns its memory


# ---- single files ----------------------------------------------------------------------------------------------


def _chw(arr: np.ndarray, path: Path) -> np.ndarray:
    """An image array as C×H×W with 1 or 3 channels: 2-D → 1 channel; HWC or CHW; a 4th (alpha) channel dropped."""
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim != 3:
        raise DataError(f"image {path} has shape {arr.shape}; expected H×W, H×W×C or C×H×W")
    if arr.shape[0] in (1, 3, 4) and (arr.shape[2] not in (1, 3, 4) or arr.shape[0] <= arr.shape[2]):
        chw = arr
    elif arr.shape[2] in (1, 3, 4):
        chw = arr.transpose(2, 0, 1)
    else:
        raise DataError(f"image {path} has shape {arr.shape}; expected 1, 3 or 4 channels first or last")
    return chw[:3] if chw.shape[0] == 4 else chw


def _scale(arr: np.ndarray, path: Path) -> np.ndarray:
    """Pixel values as float32: uint8 ÷ 255, uint16 ÷ 65535, floats kept, booleans 0/1."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255)
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / np.float32(65535)
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32)
    raise DataError(f"image {path} has dtype {arr.dtype}; expected uint8, uint16, bool or float")


def _open_pil(path: Path) -> Image.Image:
    scan(path)  # header first: a file above the pixel limit is refused before its pixels are decoded
    try:
        img = open_image(path)
        img.load()
        return img
    except READ_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read array {path}: {exc}") from None


def read_image(path) -> np.ndarray:
    """One image file as float32 C×H×W in pixel space: png/jpg bytes ÷ 255 ('L' → 1 channel, RGB/RGBA → 3,
    alpha dropped); .npy uint8 ÷ 255, floats kept."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return _scale(_chw(_load_npy(path), path), path)
    img = _open_pil(path)
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grey png
        return (np.array(img).astype(np.float32) / np.float32(65535))[None]
    if img.mode == "F":
        return np.array(img, dtype=np.float32)[None]
    if img.mode in ("1", "L", "LA"):
        return _scale(np.array(img.convert("L")), path)[None]
    return _scale(np.array(img.convert("RGB")), path).transpose(2, 0, 1)


def read_mask(path) -> np.ndarray:
    """One mask file as float32 H×W: nonzero (in any channel) = spurious = 1."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        arr = _load_npy(path)
    else:
        arr = np.array(_open_pil(path))
    if arr.ndim == 3:
        arr = _chw(arr, path).any(axis=0)
    if arr.ndim != 2:
        raise DataError(f"mask {path} has shape {arr.shape}; expected H×W (or one channel)")
    return (arr != 0).astype(np.float32)


# ---- folders ---------------------------------------------------------------------------------------------------


def subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path, suffixes) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes)


def natural_classes(names: list[str]) -> list[str]:
    """Sorted class names; numerically when every name is an integer (so folder 10 comes after folder 9)."""
    if names and all(n.isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def is_saved_layout(root: Path) -> bool:
    """True for the layout `save_folder` writes: only `images/` (and `masks/`) as subfolders."""
    names = {p.name for p in subdirs(root)}
    return "images" in names and names <= {"images", "masks"}


def _saved_class_names(names, meta_path: Path) -> list[str]:
    """dataset.json's class_names: distinct non-empty strings (a string alone would be read letter by letter)."""
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{meta_path}: class_names must be a list of non-empty strings, not {str(names)[:80]}")
    if len(set(names)) != len(names):
        raise DataError(f"{meta_path}: class_names has duplicates: {names}")
    return names


def load_folder(root, mask_dir=None, class_names=None) -> Dataset:
    """Load `root/<class>/<file>` (.png/.jpg/.jpeg/.npy) with an optional mirrored `mask_dir/<class>/<stem>.png|npy`.

    Classes are the sorted subfolder names, or, when `class_names` (the model's classes) is given, each folder is
    mapped to its index in that list. A root holding `images/` (and `masks/`) — what `save_folder` writes — is
    read as that layout, with its `dataset.json` restoring names, groups and the original item order.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    saved = None
    if is_saved_layout(root):
        if mask_dir is None and (root / "masks").is_dir():
            mask_dir = root / "masks"
        meta_path = root / "dataset.json"
        if meta_path.is_file():
            try:
                saved = safe_json.loads(meta_path.read_bytes(), str(meta_path), error=DataError)
            except OSError as exc:
                raise DataError(f"cannot read {meta_path}: {exc}") from None
        image_root = root / "images"
    else:
        image_root = root
    mask_root = Path(mask_dir) if mask_dir is not None else None
    if mask_root is not None and not mask_root.is_dir():
        raise DataError(f"mask folder {mask_root} does not exist or is not a folder")

    folders = subdirs(image_root)
    if not folders:
        loose = _files(image_root, IMAGE_SUFFIXES)
        hint = "put each class's images in its own subfolder: DIR/<class>/<file>.png"
        if loose:
            raise DataError(f"data folder {image_root} holds images but no class subfolders", hint=hint)
        raise DataError(f"data folder {image_root} is empty: no class subfolders", hint=hint)
    if saved is not None and not isinstance(saved, dict):
        raise DataError(f"{meta_path} must hold a JSON object, not {type(saved).__name__}")
    if class_names is None and saved is not None and saved.get("class_names") is not None:
        class_names = _saved_class_names(saved["class_names"], meta_path)
    if class_names is None:
        names = natural_classes([f.name for f in folders])
    else:
        names = [str(c) for c in class_names]
        for f in folders:
            if f.name not in names:
                raise DataError(f"class folder '{f.name}' in {image_root} is not one of the model's classes",
                                hint=f"classes: {', '.join(names)}")
    index_of = {n: i for i, n in enumerate(names)}

    files: list[Path] = []
    labels: list[int] = []
    by_name = {f.name: f for f in folders}
    for folder in (by_name[n] for n in natural_classes(list(by_name))):  # item order: folder names, not classes
        found = _files(folder, IMAGE_SUFFIXES)
        if not found and class_names is None:
            raise DataError(f"class folder {folder} holds no images (.png, .jpg, .jpeg, .npy)")
        files += found
        labels += [index_of[folder.name]] * len(found)
    if not files:
        raise DataError(f"data folder {image_root} holds no images (.png, .jpg, .jpeg, .npy) in its class folders")

    # The save_folder layout names files by their original index: restore that order.
    order = list(range(len(files)))
    stems = [f.stem for f in files]
    restored = saved is not None and all(s.isdigit() for s in stems) and \
        sorted(int(s) for s in stems) == list(range(len(files)))
    if restored:
        order = sorted(order, key=lambda i: int(stems[i]))
    files = [files[i] for i in order]
    labels = [labels[i] for i in order]

    arrays = []
    for f in files:
        arr = read_image(f)
        if arrays and arr.shape != arrays[0].shape:
            first = files[0]
            what = "channel counts" if arr.shape[0] != arrays[0].shape[0] else "sizes"
            raise DataError(f"images in {image_root} differ in {what}: {first} is "
                            f"{'×'.join(map(str, arrays[0].shape))} but {f} is {'×'.join(map(str, arr.shape))}",
                            hint="pass --resize shorter (or plain) to bring every image to the model's input "
                                 "(library: load_data(..., input_spec=card.input, resize='shorter'))")
        arrays.append(arr)
    x = torch.from_numpy(np.stack(arrays))
    n, _, h, w = x.shape

    mask = torch.zeros(n, 1, h, w)
    has_mask = torch.zeros(n, dtype=torch.bool)
    if mask_root is not None:
        by_key = {(f.parent.name, f.stem): i for i, f in enumerate(files)}
        if len(by_key) != len(files):
            dup = next(f for f in files if sum(g.parent == f.parent and g.stem == f.stem for g in files) > 1)
            raise DataError(f"two images share the stem '{dup.stem}' in {dup.parent}, so their masks are ambiguous")
        for mfolder in subdirs(mask_root):
            for mfile in _files(mfolder, MASK_SUFFIXES):
                i = by_key.get((mfolder.name, mfile.stem))
                if i is None:
                    raise DataError(f"mask {mfile} has no image: expected {image_root / mfolder.name / mfile.stem}"
                                    f".(png|jpg|jpeg|npy)")
                if has_mask[i]:
                    raise DataError(f"image {files[i]} has two masks in {mfolder} (.png and .npy)")
                m = read_mask(mfile)
                if m.shape != (h, w):
                    raise DataError(f"mask {mfile} is {m.shape[0]}×{m.shape[1]} but its image {files[i]} is {h}×{w}")
                mask[i, 0] = torch.from_numpy(m)
                has_mask[i] = True
        for loose in _files(mask_root, MASK_SUFFIXES):
            raise DataError(f"mask {loose} has no image: masks go in {mask_root}/<class>/<stem>.png")

    info = {"source": "folder", "root": str(root), "files": [str(f.relative_to(image_root)) for f in files]}
    if mask_root is not None:
        info["mask_dir"] = str(mask_root)
    group = group_names = None
    name = root.name or str(root)
    if saved is not None:
        name = saved.get("name", name)
        saved_info = saved.get("info") or {}
        for key, value in saved_info.items():
            if key not in PER_ITEM_INFO and key not in info:
                info[key] = value
        if restored:
            if saved.get("group") is not None and len(saved["group"]) == n:
                group, group_names = torch.tensor(saved["group"], dtype=torch.long), saved.get("group_names")
            if isinstance(saved_info.get("poisoned"), list) and len(saved_info["poisoned"]) == n:
                info["poisoned"] = torch.tensor(saved_info["poisoned"], dtype=torch.bool)
            if isinstance(saved_info.get("index"), list) and len(saved_info["index"]) == n:
                info["index"] = torch.tensor(saved_info["index"], dtype=torch.long)
    return Dataset(x=x, y=torch.tensor(labels, dtype=torch.long), mask=mask, has_mask=has_mask, group=group,
                   class_names=names, group_names=group_names, name=name, info=info)


def _json_safe(value):
    """info values as JSON: tensors and arrays become lists, paths strings, unknown objects their str()."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def safe_class_dir(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise DataError(f"class name '{name}' cannot be a folder name", hint="rename the class")
    return name


def save_folder(dataset: Dataset, out_dir, fmt: str = "png") -> Path:
    """Write `out_dir/images/<class>/<index:05d>.<fmt>`, `out_dir/masks/<class>/<index:05d>.<fmt>` (items with a
    mask only) and `out_dir/dataset.json` (name, classes, counts, groups, info with the checksum).

    png stores round(x·255) as uint8 (exact for data that came from bytes); npy stores float32 arrays. Written
    into a temporary sibling folder and renamed into place, so a failure leaves nothing; a non-empty `out_dir`
    is refused.
    """
    if fmt not in ("png", "npy"):
        raise DataError(f"folder format must be png or npy, not '{fmt}'")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"output folder {out_dir} exists and is not empty", hint="choose a new folder")
    c = dataset.shape[0]
    if fmt == "png":
        if c not in (1, 3):
            raise DataError(f"dataset '{dataset.name}' has {c} channels; png holds 1 or 3", hint="use fmt='npy'")
        if len(dataset) and (float(dataset.x.min()) < 0 or float(dataset.x.max()) > 1):
            raise DataError(f"dataset '{dataset.name}' has values outside [0, 1]; png would clip them",
                            hint="use fmt='npy'")
    dirs = [safe_class_dir(n) for n in dataset.class_names]
    with staged_folder(out_dir) as staging:
        (staging / "images").mkdir()
        (staging / "masks").mkdir()
        if fmt == "png":
            pixels = (dataset.x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        masks = (dataset.mask[:, 0] != 0).numpy()
        ys, has_mask = dataset.y.tolist(), dataset.has_mask.tolist()
        for i in range(len(dataset)):
            sub = dirs[ys[i]]
            img_dir, mask_dir = staging / "images" / sub, staging / "masks" / sub
            img_dir.mkdir(exist_ok=True)
            if fmt == "png":
                arr = pixels[i, :, :, 0] if c == 1 else pixels[i]
                Image.fromarray(arr).save(img_dir / f"{i:05d}.png")
            else:
                np.save(img_dir / f"{i:05d}.npy", dataset.x[i].numpy())
            if has_mask[i]:
                mask_dir.mkdir(exist_ok=True)
                if fmt == "png":
                    Image.fromarray(masks[i].astype(np.uint8) * 255).save(mask_dir / f"{i:05d}.png")
                else:
                    np.save(mask_dir / f"{i:05d}.npy", dataset.mask[i, 0].numpy())
        counts = dataset.class_counts().tolist()
        meta = {
            "format": FOLDER_FORMAT,
            "name": dataset.name,
            "n": len(dataset),
            "file_format": fmt,
            "class_names": list(dataset.class_names),
            "counts": dict(zip(dataset.class_names, counts)),
            "with_mask": int(dataset.has_mask.sum()),
            "group_names": list(dataset.group_names),
            "group": None if torch.equal(dataset.group, dataset.y) else dataset.group.tolist(),
            "info": _json_safe({**dataset.info, "checksum": dataset.checksum()}),
        }
        (staging / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out_dir


# ---- bundles ---------------------------------------------------------------------------------------------------


def _read_bundle_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    suffix = path.suffix.lower()
    if suffix == ".npz" and path.is_file() and not zipfile.is_zipfile(path):
        # np.load would try to unpickle a non-zip file and suggest allow_pickle; never do that for data
        raise DataError(f"bundle {path} is not a valid npz (not a zip archive)",
                        hint="write it with numpy.savez or modelfix.data.save_bundle")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            return arrays, {}
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                arrays = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata() or {}
            return arrays, meta
    except FileNotFoundError:
        raise DataError(f"bundle {path} does not exist") from None
    except Exception as exc:  # zip, npy and safetensors errors come in many types
        raise DataError(f"cannot read bundle {path}: {exc}") from None
    raise DataError(f"bundle {path} must end in .npz or .safetensors")


def _names(arrays: dict, meta: dict, key: str, path: Path) -> list[str] | None:
    if key in meta:
        try:
            names = json.loads(meta[key])
        except ValueError:
            raise DataError(f"bundle {path}: metadata '{key}' is not a JSON list") from None
    elif key in arrays:
        names = arrays[key].tolist()
    else:
        return None
    if not isinstance(names, list):
        raise DataError(f"bundle {path}: '{key}' must be a list of names")
    return [str(n) for n in names]


def load_bundle(path, class_names=None) -> Dataset:
    """Load a `.npz` or `.safetensors` bundle: `x` (N×C×H×W or N×H×W; uint8 ÷ 255), `y`, optional `mask`
    (N×H×W or N×1×H×W, nonzero = spurious), `has_mask`, `group`, `class_names`, `group_names` (npz string arrays
    or safetensors metadata JSON). With `class_names` (the model's classes) the bundle's own names are mapped onto
    them by name.
    """
    path = Path(path)
    arrays, meta = _read_bundle_arrays(path)
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"bundle {path} has no '{key}' array (found: {', '.join(sorted(arrays)) or 'nothing'})")
    x = arrays["x"]
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"bundle {path}: 'x' has shape {x.shape}; expected N×C×H×W or N×H×W")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise DataError(f"bundle {path}: 'x' has dtype {x.dtype}; expected uint8 or float")
    n, _, h, w = x.shape
    y = arrays["y"]
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"bundle {path}: 'y' has shape {y.shape} and dtype {y.dtype}; expected {n} integer labels")
    y = y.astype(np.int64)
    mask = has_mask = group = None
    if "mask" in arrays:
        m = arrays["mask"]
        if m.ndim == 4 and m.shape[1] == 1:
            m = m[:, 0]
        if m.shape != (n, h, w):
            raise DataError(f"bundle {path}: 'mask' has shape {m.shape}; "
                            f"expected ({n}, {h}, {w}) or ({n}, 1, {h}, {w})")
        mask = torch.from_numpy((m != 0).astype(np.float32)[:, None])
        has_mask = torch.ones(n, dtype=torch.bool)
        if "has_mask" in arrays:
            hm = arrays["has_mask"]
            if hm.shape != (n,):
                raise DataError(f"bundle {path}: 'has_mask' has shape {hm.shape}; expected ({n},)")
            has_mask = torch.from_numpy(hm.astype(bool))
    if "group" in arrays:
        g = arrays["group"]
        if g.shape != (n,) or not np.issubdtype(g.dtype, np.integer):
            raise DataError(f"bundle {path}: 'group' has shape {g.shape} and dtype {g.dtype}; expected {n} integers")
        group = torch.from_numpy(g.astype(np.int64))

    own_names = _names(arrays, meta, "class_names", path)
    names = own_names
    if class_names is not None:
        names = [str(c) for c in class_names]
        if own_names is not None and own_names != names:
            for c in own_names:
                if c not in names:
                    raise DataError(f"bundle {path}: class '{c}' is not one of the model's classes",
                                    hint=f"classes: {', '.join(names)}")
            remap = np.array([names.index(c) for c in own_names], dtype=np.int64)
            if n and (y.min() < 0 or y.max() >= len(own_names)):
                raise DataError(f"bundle {path}: 'y' holds label {int(y.max())} "
                                f"beyond its {len(own_names)} class names")
            y = remap[y]
    if names is not None and n and (y.min() < 0 or y.max() >= len(names)):
        raise DataError(f"bundle {path}: 'y' holds label {int(y.max() if y.max() >= len(names) else y.min())} "
                        f"outside the {len(names)} classes")
    info = {"source": "bundle", "path": str(path)}
    for key in PER_ITEM_INFO:
        if key in arrays and key != "files" and arrays[key].shape == (n,):
            value = torch.from_numpy(arrays[key].copy())
            info[key] = value.bool() if key == "poisoned" else value.long()
    name = meta.get("name") or (str(arrays["name"]) if "name" in arrays else path.stem)
    return Dataset(x=torch.from_numpy(x), y=torch.from_numpy(y), mask=mask, has_mask=has_mask, group=group,
                   class_names=names, group_names=_names(arrays, meta, "group_names", path), name=name, info=info)


def save_bundle(dataset: Dataset, path) -> Path:
    """Write a dataset as a `.npz` (or `.safetensors`) bundle that `load_bundle` reads back exactly; atomic."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".safetensors"):
        raise DataError(f"bundle {path} must end in .npz or .safetensors")
    arrays = {"x": dataset.x.numpy(), "y": dataset.y.numpy(), "mask": dataset.mask.numpy(),
              "has_mask": dataset.has_mask.numpy(), "group": dataset.group.numpy()}
    if isinstance(dataset.info.get("poisoned"), torch.Tensor):
        arrays["poisoned"] = dataset.info["poisoned"].numpy()
    if suffix == ".npz":
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays, class_names=np.array(dataset.class_names, dtype=str),
                            group_names=np.array(dataset.group_names, dtype=str), name=np.array(dataset.name, dtype=str))
        payload = buffer.getvalue()
    else:
        from safetensors.numpy import save

        meta = {"class_names": json.dumps(list(dataset.class_names)),
                "group_names": json.dumps(list(dataset.group_names)), "name": dataset.name}
        arrays["has_mask"] = arrays["has_mask"].astype(np.uint8)
        if "poisoned" in arrays:
            arrays["poisoned"] = arrays["poisoned"].astype(np.uint8)
        payload = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta)
    return write_bytes_atomic(path, payload)
