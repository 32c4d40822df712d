"""Teacher annotations (TAP, Zhang et al. AAAI 2024, §1.5 of methods_guided_finetunes.md): masks of the pixels a
teacher finds least salient, for guided fine-tunes when no ground-truth masks exist.

`modelfix annotate TEACHER --data DIR --tau 0.01 -o MASKS/`:

1. saliency  E_b = Σ_c |∂(Σ_k log p_k(x_b)) / ∂z_b,c|, z = (x − mean)/std the network input, teacher in eval
   mode. Not label-specific (Ross et al.'s and TAP's explanation), so annotating needs no labels.
2. mask      M_b = 1 on the τ-fraction of pixels with the lowest E_b (1 = penalise), per image.

Selection rule. TAP's code thresholds each image at its τ-quantile (`torch.quantile`, linear interpolation) and
marks the pixels with E ≤ q. With distinct scores that marks floor(τ(D−1)) + 1 pixels, and every pixel tied with
the quantile on top (an all-zero saliency map marks the whole image). Here exactly k = max(1, round(τ·D)) pixels
are marked, D = H·W, ties broken by pixel order (row-major, earliest first), so every image carries the same mask
mass whatever its ties. On MNIST (D = 784) the counts are, TAP / here: τ = 0.01: 8 / 8; 0.05: 40 / 39;
0.1: 79 / 78. With distinct scores they never differ by more than one pixel. `round` is Python's (halves to even).

The random-annotation baseline (TAP's control) scores every pixel |N(0, 1)| from a seeded generator, so it marks a
uniformly random k-subset of each image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .. import distributed
from ..data import Dataset, save_bundle
from ..data.sources import safe_class_dir, staged_folder
from ..errors import DataError, ModelfixError

BUNDLE_SUFFIXES = (".npz", ".safetensors")


def saliency(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """|∂(Σ_k log p_k)/∂z| summed over channels, N×1×H×W (float32, on the CPU), z = (x − mean)/std.

    The gradient is taken w.r.t. the pixels x and multiplied by the wrapper's std (∂/∂z = std · ∂/∂x), which is
    the same thing without reaching into the network. The model runs in eval mode; every module's own train/eval
    flag is restored afterwards. Each image's gradient is its own: in eval mode nothing couples a batch.
    """
    if x.dim() != 4:
        raise ModelfixError(f"saliency needs images N×C×H×W, got shape {tuple(x.shape)}")
    if batch_size < 1:
        raise ModelfixError(f"--batch-size must be at least 1, not {batch_size}")
    flags = [(module, module.training) for module in model.modules()]
    device = next(model.parameters()).device
    std = getattr(model, "std", None)
    out = torch.empty(x.shape[0], 1, x.shape[2], x.shape[3])
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device).detach().requires_grad_(True)
            scalar = torch.log_softmax(model(xb), dim=1).sum()
            (grad,) = torch.autograd.grad(scalar, xb)
            if isinstance(std, Tensor):
                grad = grad * std.to(grad.dtype)
            out[start:start + len(xb)] = grad.abs().sum(dim=1, keepdim=True).float().cpu()
    finally:
        for module, flag in flags:
            module.training = flag
    return out


def check_tau(tau: float) -> float:
    """τ as a float in the open interval (0, 1), else one clear error naming --tau."""
    try:
        value = float(tau)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value < 1.0:  # also false for NaN
        raise ModelfixError(f"--tau must lie strictly between 0 and 1 (the fraction of pixels to penalise), "
                            f"got {tau!r}", hint="TAP uses 0.01, 0.05 or 0.1")
    return value


def mask_size(tau: float, pixels: int) -> int:
    """k = max(1, round(τ·D)): the number of pixels each image's mask marks."""
    return max(1, round(check_tau(tau) * pixels))


def lowest_fraction_mask(scores: Tensor, tau: float) -> Tensor:
    """Per image, 1 on exactly k = max(1, round(τ·H·W)) pixels with the lowest scores, 0 elsewhere.

    `scores` is N×1×H×W (or N×H×W; the mask has the same shape). Ties go to the earlier pixel in row-major order
    (a stable sort), so the result is deterministic.
    """
    if scores.dim() not in (3, 4) or (scores.dim() == 4 and scores.shape[1] != 1):
        raise ModelfixError(f"scores must be N×1×H×W or N×H×W, got shape {tuple(scores.shape)}")
    n = scores.shape[0]
    flat = scores.reshape(n, -1)
    k = mask_size(tau, flat.shape[1])
    order = torch.sort(flat, dim=1, stable=True).indices[:, :k]
    mask = torch.zeros(flat.shape, dtype=torch.float32)
    mask.scatter_(1, order.cpu(), 1.0)
    return mask.reshape(scores.shape)


def random_scores(shape, seed: int = 0) -> Tensor:
    """|N(0, 1)| per pixel from `torch.Generator().manual_seed(seed)`: the random-annotation baseline."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(int(seed))).abs()


def annotate(model: nn.Module | None, data: Dataset, tau: float = 0.01, random: bool = False, seed: int = 0,
             batch_size: int = 256) -> Dataset:
    """`data` with its mask replaced by the teacher mask (1 = penalise) and `has_mask` all True.

    `random=True` ignores `model` (it may be None) and scores pixels with seeded |N(0, 1)| noise. The settings go
    to `info["annotation"]`; the stored checksum is recomputed, since the mask is part of it.
    """
    tau = check_tau(tau)
    n, _, h, w = data.x.shape
    if random:
        scores = random_scores((n, 1, h, w), seed)
    else:
        if model is None:
            raise ModelfixError("annotate needs a teacher model (or random=True for random annotations)")
        # under torchrun each process scores its block of whole batches; every process gets all the scores back
        rows = distributed.batch_block(n, batch_size)
        scores = distributed.concat_shards(saliency(model, data.x[rows.start:rows.stop], batch_size))
    mask = lowest_fraction_mask(scores, tau)
    info = {key: value for key, value in data.info.items() if key != "checksum"}
    info["annotation"] = {"kind": "random" if random else "teacher-saliency", "tau": tau,
                          "pixels_per_image": mask_size(tau, h * w), "seed": int(seed) if random else None,
                          "saliency": None if random else "sum_c |d(sum_k log p_k)/dz|"}
    out = data.with_(mask=mask, has_mask=torch.ones(n, dtype=torch.bool), info=info)
    out.info["checksum"] = out.checksum()
    return out


# ---- writing ----------------------------------------------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def write_masks(data: Dataset, out) -> Path:
    """Write `data`'s masks where `load_data` reads them back; atomic, nothing half-written on error.

    - `out` ending in .npz / .safetensors: a bundle with x, y, mask, has_mask, group and the class names
      (`sources.save_bundle`), for any data;
    - otherwise a mask folder mirroring the image folder the data came from (`info["files"]`, paths relative to
      the image root): `out/<class>/<stem>.png`, 255 = penalise, read by `load_data(DIR, mask_dir=out)`. It is
      written into a temporary sibling folder and renamed into place; an existing non-empty `out` is refused, and
      so is an `out` inside the data folder (it would become part of the data).

    Data that did not come from an image folder (a scenario, a bundle) can only be written as a bundle.
    """
    out = Path(out)
    source_root = data.info.get("root") or data.info.get("path")
    if source_root is not None and _inside(out, Path(source_root)):
        raise ModelfixError(f"-o {out} lies inside the data {source_root}; the masks would become part of the data",
                            hint="write the masks to a folder outside the data")
    if out.suffix.lower() in BUNDLE_SUFFIXES:
        return save_bundle(data, out)
    files = data.info.get("files")
    if data.info.get("source") != "folder" or not isinstance(files, list) or len(files) != len(data):
        raise ModelfixError(f"-o {out}: the data did not come from an image folder, so there is no folder to "
                            f"mirror", hint="write a bundle instead: -o masks.npz (x, y and mask)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"output folder {out} exists and is not empty", hint="choose a new folder")
    targets = []
    for rel in files:
        rel = Path(rel)
        if len(rel.parts) != 2:
            raise DataError(f"image path '{rel}' is not <class>/<file>; cannot mirror it as a mask folder")
        targets.append(Path(safe_class_dir(rel.parts[0])) / f"{rel.stem}.png")
    if len(set(targets)) != len(targets):
        raise DataError("two images share a class folder and a stem, so their masks would collide",
                        hint="write a bundle instead: -o masks.npz")
    masks = (data.mask[:, 0] != 0).numpy()
    with staged_folder(out) as staging:
        for i, target in enumerate(targets):
            if not data.has_mask[i]:
                continue  # no file = no mask, as load_folder reads it
            (staging / target.parent).mkdir(exist_ok=True)
            Image.fromarray(masks[i].astype(np.uint8) * 255).save(staging / target)
    return out
