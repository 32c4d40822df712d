"""R4's explanation-fragility metric δ (R4 Appendix F; methods_guided_finetunes.md §2.9): how much the input
gradient of the loss can change while the masked pixels move inside the box x ± ε·M.

Per item, the sound bounds [G_l, G_u] of `repair.intervals.input_gradient_bounds` over the box give the width
max_i (G_u,i − G_l,i) over the pixels of the region; δ is the **maximum over the data** (R4 averages that over
restarts). δ_masked perturbs and measures the artifact mask M, δ_core the complement 1 − M (R4 Table 2 reports
δ_masked / δ_core: a model that ignores the artifact has a small ratio). Mean widths are reported as well because a
single outlier decides a maximum.

Bounds are of the eval-mode function and need a network the interval module supports.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import distributed
from .data import Dataset
from .errors import DataError
from .repair.guidance.pgd_ex import check_eps
from .repair.intervals import input_gradient_bounds

REGIONS = ("masked", "core")


def _widths(model: nn.Module, x: torch.Tensor, y: torch.Tensor, region: torch.Tensor, eps: float) -> torch.Tensor:
    """Per item: the largest bound width max_i (G_u − G_l) over the pixels of `region` (N×1×H×W, 0/1)."""
    g_lower, g_upper = input_gradient_bounds(model, x, y, region, eps)
    width = (g_upper - g_lower) * region.expand_as(x)
    return width.flatten(1).amax(1)


@torch.no_grad()
def fragility(model: nn.Module, data: Dataset, eps: float, mask: torch.Tensor | None = None,
              batch_size: int = 500) -> dict:
    """δ on the masked region and on the core (module docstring) over the items of `data` that have a mask.
    Under torchrun each process bounds its block of whole batches; the widths of all items are gathered, so the
    maximum and mean are the one-process numbers.

    `mask` (1×H×W or H×W, 1 = artifact region) replaces the per-item masks for every item, e.g. R4's test mask of
    all four corners; None uses `data.mask` (the items without a mask are skipped).
    """
    eps = check_eps(eps, "--fragility")
    if mask is None:
        keep = data.has_mask.nonzero().flatten()
        if len(keep) == 0:
            raise DataError("--fragility needs masks of the artifact region, but no test item has one",
                            hint="give data with masks (a bundle with masks, --masks DIR, or a decoy scenario)")
        data = data.subset(keep)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    widths: dict[str, list[torch.Tensor]] = {region: [torch.zeros(0)] for region in REGIONS}
    rows = distributed.batch_block(len(data), batch_size)  # under torchrun: this process's whole batches
    block = data if len(rows) == len(data) else data.subset(slice(rows.start, rows.stop))
    try:
        for batch in block.batches(batch_size):
            x, y = batch["x"].to(device), batch["y"].to(device)
            region = (batch["mask"] if mask is None else mask.reshape(1, 1, *x.shape[-2:]).expand(len(x), -1, -1, -1))
            region = (region.to(device) > 0.5).to(x.dtype)
            widths["masked"].append(_widths(model, x, y, region, eps).cpu())
            widths["core"].append(_widths(model, x, y, 1 - region, eps).cpu())
    finally:
        model.train(was_training)
    result = {"eps": eps, "n": len(data), "mask": "per item" if mask is None else "fixed"}
    for region, parts in widths.items():
        values = distributed.concat_shards(torch.cat(parts).double())  # every item's width, in item order
        result[region] = float(values.max())
        result[f"{region}_mean"] = float(values.mean())
    core = result["core"]
    result["ratio"] = result["masked"] / core if core > 0 else math.inf
    return result


def fragility_of_test(model: nn.Module, data: Dataset, artifact, eps: float, labels: str = "random",
                      seed: int = 0) -> dict:
    """δ for `evaluate --fragility`: on the data's own masks when it has any, else on the artifact pasted on every
    item (`poison` at level 1 with the first label mode and the evaluation seed, i.e. the fully poisoned test)."""
    from .data.poison import poison

    source = "masks"
    if not bool(data.has_mask.any()):
        if artifact is None:
            raise DataError("--fragility needs masks of the artifact region: the data have none and no artifact is "
                            "known", hint="pass --masks DIR or --artifact SPEC")
        data, source = poison(data, artifact, 1.0, labels, seed=seed), "artifact pasted on every item"
    return {**fragility(model, data, eps), "source": source}
