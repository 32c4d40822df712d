"""EGEM and PCA-EGEM: post-hoc soft pruning of what the approved refinement data does not use (Linhardt, Müller,
Montavon, "Preemptively Pruning Clever-Hans Strategies in Deep Neural Networks"; notes §1.3, §2, §3).

- `egem` (paper Eq. 5): at every refinement point, each unit (conv: channel) is scaled, `a_i ← c_i·a_i` with
  `c_i = E[a_i²] / (E[a_i²] + λ)`. For conv maps `E[a_i²]` is the second moment of the per-image channel *sum*.
- `pca-egem` (paper Eq. 6): the same shrinkage in the PCA basis of the centred refinement activations,
  `a ← ā + U diag(c) Uᵀ (a − ā)` with `c_k = σ_k² / (σ_k² + λ)`; directions without variance get `c = 0` and are
  left out of the mean factor that τ targets (`pca_mean_factor`).
  Conv maps use the paper code's per-image channel-sum ratio (`sum`) or a 1×1 affine map per position (`position`).

One scalar α sets a target mean factor τ_l per refined layer (triangular schedule, §3.1), λ_l is searched to hit it
(§3.2), and α is chosen on validation data by the slack rule (§3.4). Statistics come from one forward pass over the
unique fit samples, weighted by their oversampling multiplicities; they do not depend on α, so the α grid costs one
validation pass per α and nothing over the fit data. The refinements are inserted as patches (`patches.py`) into a
copy of the model.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from modelfix import distributed
from modelfix.data.dataset import Dataset
from modelfix.errors import DataError, ModelfixError, UnsupportedModel
from modelfix.evaluate import predict_variants
from modelfix.progress import progress_bar
from modelfix.repair.patches import ChannelScale, PCAffine, PCASumRatio, attach_patch, remove_patch
from modelfix.repair.refinement import RefinementSplit, weighted_accuracy
from modelfix.repair.counterfactual import (check_rule, group_score, posthoc_counterfactual, rule_name, score_model,
                                            select_counterfactual)
from modelfix.repair.registry import method
from modelfix.repair.selection import check_slack, selection_table

if TYPE_CHECKING:  # points.py is imported where it is used (fit_egem), keeping this module importable on its own
    from modelfix.repair.points import Point

ALPHA_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SCHEDULES = ("triangular", "inverse-triangular", "flat")
METHODS = ("egem", "pca-egem", "egem-full")
CONV_MODES = ("sum", "position")

# Eigenvalues below EIG_TOL·max are rank deficiency (or float noise), not variance: their factor is 0 (§2.2), the
# streaming equivalent of the reference's PCA truncated to min(n, d) components.
EIG_TOL = 1e-10
# A unit or direction whose factor falls below this counts as pruned in the trace.
PRUNED_BELOW = 0.01


# ---- schedule, factors, λ search ------------------------------------------------------------------------------


def tau_schedule(alpha: float, n_layers: int, kind: str = "triangular") -> list[float]:
    """Target mean factors τ_1…τ_L for the refined layers in execution order (notes §3.1).

    - `triangular` (default; reference code and the paper's prose): `τ_l = 1 − (1−α)(l−1)/(L−1)`, so the first
      layer is untouched and the last is pruned hardest (τ_L = α);
    - `inverse-triangular` (the paper's printed formula, §10.1): `τ_l = α + (1−α)(l−1)/(L−1)`;
    - `flat`: `τ_l = α`.
    With one layer every schedule gives `[α]` (the reference's formula would give 1, i.e. no pruning at all).
    """
    if kind not in SCHEDULES:
        raise ModelfixError(f"unknown schedule '{kind}'", hint=f"one of {', '.join(SCHEDULES)}")
    if n_layers < 1:
        return []
    if n_layers == 1 or kind == "flat":
        return [float(alpha)] * n_layers
    steps = [(l - 1) / (n_layers - 1) for l in range(1, n_layers + 1)]
    # written as interpolations so that the end points are exactly 1 and α (no 1 − (1 − α) rounding)
    if kind == "triangular":
        return [(1.0 - t) + t * alpha for t in steps]
    return [(1.0 - t) * alpha + t for t in steps]


def egem_factors(second_moment: Tensor, lam: float) -> Tensor:
    """EGEM's per-unit factors `c = E[a²] / (E[a²] + λ)` (paper Eq. 5).

    Dead units (`E[a²] = 0`) get 0 for any λ > 0 (harmless: they carry nothing); λ = 0 is the identity (all ones).
    """
    s2 = second_moment.to(torch.float64)
    if lam <= 0:
        return torch.ones_like(s2)
    return torch.where(s2 > 0, s2 / (s2 + lam), torch.zeros_like(s2))


def pca_factors(eigenvalues: Tensor, lam: float, tol: float = EIG_TOL) -> Tensor:
    """PCA-EGEM's per-direction factors `c_k = σ_k² / (σ_k² + λ)` (paper Eq. 6).

    Eigenvalues below `tol·max` (no variance in the refinement data: rank deficiency, duplicates from
    oversampling) are clamped to 0 and get factor 0, so directions outside the data's span are removed. λ = 0 is
    the identity (all ones), the same convention as `egem_factors`.
    """
    ev = eigenvalues.to(torch.float64)
    if lam <= 0:
        return torch.ones_like(ev)
    top = float(ev.max()) if ev.numel() else 0.0
    keep = ev > tol * max(top, 0.0)
    ev = torch.where(keep, ev, torch.zeros_like(ev))
    return torch.where(keep, ev / (ev + lam), torch.zeros_like(ev))


def pca_mean_factor(eigenvalues: Tensor, lam: float, tol: float = EIG_TOL) -> float:
    """The mean of `pca_factors` over the directions WITH variance (eigenvalue > tol·max), the quantity τ targets.

    Directions without variance always get 0; counting them would cap the reachable mean at rank/d, so with fewer
    unique samples than dimensions a τ above that could never be met and α would stop controlling the layer. With no
    direction of variance at all the mean is 0 (there is nothing to keep)."""
    ev = eigenvalues.to(torch.float64)
    top = float(ev.max()) if ev.numel() else 0.0
    keep = ev > tol * max(top, 0.0)
    if not bool(keep.any()):
        return 0.0
    return float(pca_factors(ev, lam, tol)[keep].mean())


def search_lambda(
    mean_factor: Callable[[float], float], tau: float, scale: float, steps: int = 30
) -> tuple[float, float]:
    """The λ whose mean factor just reaches `tau` (notes §3.2): `(λ, achieved mean)` with achieved ≤ τ.

    `mean_factor` must decrease in λ. The search starts at `1e-12·scale` (scale = the largest second moment or
    eigenvalue, so the result does not depend on the activations' units), doubles while the mean is above τ, then
    bisects `steps` times in log λ between the last two values. τ ≥ 1 is the identity: `(0.0, 1.0)`.
    """
    if tau >= 1.0:
        return 0.0, 1.0
    lam = 1e-12 * max(float(scale), 1e-300)
    value = mean_factor(lam)
    if value <= tau:  # already there (e.g. most units dead or rank-deficient): the gentlest λ tried
        return lam, value
    while value > tau:
        lam *= 2.0
        if math.isinf(lam):  # cannot happen for finite statistics and τ > 0; guards a non-decreasing callable
            raise ValueError(f"no λ reaches mean factor {tau}")
        value = mean_factor(lam)
    lo, hi, hi_value = lam / 2.0, lam, value  # mean(lo) > τ ≥ mean(hi)
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        mid_value = mean_factor(mid)
        if mid_value > tau:
            lo = mid
        else:
            hi, hi_value = mid, mid_value
    return hi, hi_value


# ---- statistics ------------------------------------------------------------------------------------------------


@dataclass
class LayerStats:
    """Forward statistics of one refinement point on the (weighted) fit data, all float64 on the CPU.

    - `n`: weighted number of items (Σ counts);
    - `second_moment`: uncentred `E[a²]` per unit; for conv maps of the per-image channel *sums* (notes §1.3);
    - `mean`, `cov`: mean and centred covariance of the PCA samples (None without PCA): per-image vectors
      (`dense`), per-image channel sums (`sum`), or every spatial position's channel vector (`position`);
    - `unique`: number of distinct PCA samples behind `cov` (bounds its rank; oversampling adds none).
    The eigendecomposition of `cov` is computed once, on first use (`basis()`), and reused for every α.
    """

    name: str
    kind: str
    n: float
    second_moment: Tensor
    mean: Tensor | None = None
    cov: Tensor | None = None
    pca_mode: str | None = None
    unique: int = 0
    _eigh: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def basis(self) -> tuple[Tensor, Tensor]:
        """(eigenvalues ascending, eigenvectors as columns) of `cov`, float64, computed once."""
        if self.cov is None:
            raise ValueError(f"no covariance collected for '{self.name}' (collect_stats with pca=True)")
        if self._eigh is None:
            values, vectors = torch.linalg.eigh(self.cov)
            self._eigh = (values, vectors)
        return self._eigh


class _Accumulator:
    """Streaming float64 sums for one point: S2 (EGEM), and for PCA S1, SS around a shift (the first batch's mean),
    which keeps `SS/n − mean meanᵀ` free of cancellation when the mean is large against the variance."""

    def __init__(self, point: Point, pca: bool, conv_mode: str):
        self.point = point
        self.pca_mode = None if not pca else ("dense" if point.kind == "dense" else conv_mode)
        self.n = 0.0
        self.unique = 0
        self.s2: Tensor | None = None
        self.n_pca = 0.0
        self.unique_pca = 0
        self.shift: Tensor | None = None
        self.s1: Tensor | None = None
        self.ss: Tensor | None = None
        self.calls = 0

    def add(self, output: Tensor, w: Tensor) -> None:
        # Reduced right here, inside the hook, so an in-place ReLU downstream cannot alter what is measured; the
        # float64 conversion is a copy of the float32 output anyway.
        t = output.detach().to(torch.float64)
        if self.point.kind == "conv":
            if t.ndim != 4:
                raise UnsupportedModel(f"refinement point '{self.point.name}' is a conv point but returned a "
                                       f"{t.ndim}-d tensor")
            units = t.sum(dim=(2, 3))  # per-image channel sums (paper; reference `captured_to_list`)
        else:
            units = t.flatten(1)
        self.calls += 1
        self.n += float(w.sum())
        self.unique += len(w)
        moment = w @ units.square()
        self.s2 = moment if self.s2 is None else self.s2 + moment
        if self.pca_mode is None:
            return
        if self.pca_mode == "position":  # every spatial position is a sample, weighted by its image's count
            c, h, wd = t.shape[1:]
            vectors = t.permute(0, 2, 3, 1).reshape(-1, c)
            weights = w.repeat_interleave(h * wd)
        else:
            vectors, weights = units, w
        if self.shift is None:
            self.shift = (weights @ vectors) / weights.sum().clamp(min=1e-300)
        centred = vectors - self.shift
        s1 = weights @ centred
        ss = (centred * weights[:, None]).T @ centred
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.ss = ss if self.ss is None else self.ss + ss
        self.n_pca += float(weights.sum())
        self.unique_pca += len(weights)

    def merge_processes(self) -> None:
        """Under torchrun: replace this process's sums with the sums over every process (each ran its block of
        the samples), identically on every process. The PCA sums are re-centred on one common shift (the first
        process's): with d = shift_r − shift, S1 += n·d and SS += S1 dᵀ + d S1ᵀ + n d dᵀ, all float64."""
        if distributed.world()[1] == 1:
            return
        keys = ("n", "unique", "s2", "n_pca", "unique_pca", "shift", "s1", "ss")
        parts = [p for p in distributed.gather_objects({k: getattr(self, k) for k in keys}) if p["s2"] is not None]
        if not parts:
            return
        self.n, self.unique = sum(p["n"] for p in parts), sum(p["unique"] for p in parts)
        self.n_pca, self.unique_pca = sum(p["n_pca"] for p in parts), sum(p["unique_pca"] for p in parts)
        self.s2 = sum(p["s2"].cpu() for p in parts)
        if self.pca_mode is None:
            return
        shift, s1, ss = parts[0]["shift"].cpu(), 0, 0
        for p in parts:
            d, p_s1 = p["shift"].cpu() - shift, p["s1"].cpu()
            s1 = s1 + p_s1 + p["n_pca"] * d
            ss = ss + p["ss"].cpu() + torch.outer(p_s1, d) + torch.outer(d, p_s1) + p["n_pca"] * torch.outer(d, d)
        self.shift, self.s1, self.ss = shift, s1, ss

    def finish(self) -> LayerStats:
        name = self.point.name
        if self.s2 is None or self.n <= 0:
            raise DataError(f"no fit samples reached refinement point '{name}'",
                            hint="the refinement split needs at least one fit sample with a positive count")
        stats = LayerStats(name=name, kind=self.point.kind, n=self.n, second_moment=(self.s2 / self.n).cpu(),
                           pca_mode=self.pca_mode, unique=self.unique)
        if self.pca_mode is not None:
            delta = self.s1 / self.n_pca
            cov = self.ss / self.n_pca - torch.outer(delta, delta)
            stats.mean = (self.shift + delta).cpu()
            stats.cov = ((cov + cov.T) / 2).cpu()
            stats.unique = self.unique_pca
        return stats


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), torch.zeros(()))
    return tensor.device


def collect_stats(
    model: nn.Module,
    data: Dataset,
    counts: Tensor,
    points: Sequence[Point],
    pca: bool,
    conv_mode: str = "sum",
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, LayerStats]:
    """Statistics of every point from ONE forward pass over the unique samples of `data` (notes §1.5a).

    Each sample counts `counts[i]` times (its oversampling multiplicity), which equals the statistics of the
    duplicated set exactly; samples with count 0 are not run. Eval mode (restored after), `inference_mode`;
    the capture hooks are removed in `finally`.
    """
    if conv_mode not in CONV_MODES:
        raise ModelfixError(f"unknown PCA conv mode '{conv_mode}'", hint=f"one of {', '.join(CONV_MODES)}")
    counts = torch.as_tensor(counts).reshape(-1)
    if len(counts) != len(data):
        raise ValueError(f"{len(counts)} counts for {len(data)} samples")
    device = _device(model)
    accumulators = {p.name: _Accumulator(p, pca, conv_mode) for p in points}
    active = torch.nonzero(counts > 0).flatten()
    mine = distributed.shard_indices(len(active))  # under torchrun, this process's block; merged after the pass
    active = active[mine.start:mine.stop]
    current: dict[str, Tensor] = {}
    handles = []
    was_training = model.training

    def hook_for(acc: _Accumulator):
        def hook(module: nn.Module, args: object, output: Tensor) -> None:  # returns None: output unchanged
            acc.add(output, current["w"])

        return hook

    try:
        model.eval()
        for point in points:
            module = model.net.get_submodule(point.name)
            handles.append(module.register_forward_hook(hook_for(accumulators[point.name])))
        with torch.inference_mode(), progress_bar(progress) as bar:
            task = bar.add_task("EGEM statistics", total=len(active))
            for start in range(0, len(active), batch_size):
                idx = active[start : start + batch_size]
                current["w"] = counts[idx].to(device=device, dtype=torch.float64)
                model(data.x[idx].to(device))
                for acc in accumulators.values():
                    if acc.calls != 1:
                        raise UnsupportedModel(
                            f"refinement point '{acc.point.name}' ran {acc.calls} times in one forward pass",
                            hint="choose a module that runs once per forward pass (--layers)",
                        )
                    acc.calls = 0
                bar.advance(task, len(idx))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for acc in accumulators.values():
        acc.merge_processes()
    return {name: acc.finish() for name, acc in accumulators.items()}


# ---- the refinement for one α ------------------------------------------------------------------------------------


def _pca_patch(stats: LayerStats, factors: Tensor, vectors: Tensor) -> nn.Module:
    """`M = U diag(c) Uᵀ` (float64; only directions with c > 0 enter) in the patch the layer's mode needs."""
    keep = factors > 0
    basis = vectors[:, keep]
    matrix = (basis * factors[keep]) @ basis.T
    if stats.pca_mode == "sum":
        return PCASumRatio(matrix, stats.mean)
    return PCAffine(matrix, stats.mean)


def build_refinement(
    stats: dict[str, LayerStats], points: Sequence[Point], alpha: float, schedule: str, method: str
) -> list[dict]:
    """Per point (execution order): τ from the schedule, λ searched to reach it, and the patch.

    Each entry: `name, kind, tau, lambda, mean_factor, units` (units or PCA directions), `pruned_units` (factor
    < 0.01), `pca_mode`, `patch` (None where τ ≥ 1: the layer stays the identity).
    """
    if method not in ("egem", "pca-egem"):
        raise ModelfixError(f"build_refinement handles egem and pca-egem, not '{method}'")
    taus = tau_schedule(alpha, len(points), schedule)
    layers = []
    for point, tau in zip(points, taus):
        layer = stats[point.name]
        if method == "egem":
            s2 = layer.second_moment
            lam, mean = search_lambda(lambda l: float(egem_factors(s2, l).mean()), tau, float(s2.max()))
            factors = egem_factors(s2, lam)
            patch = ChannelScale(factors) if lam > 0 else None
        else:
            values, vectors = layer.basis()
            lam, mean = search_lambda(lambda l: pca_mean_factor(values, l), tau, float(values.max()))
            factors = pca_factors(values, lam)
            patch = _pca_patch(layer, factors, vectors) if lam > 0 else None
        layers.append({
            "name": point.name,
            "kind": point.kind,
            "tau": float(tau),
            "lambda": float(lam),
            "mean_factor": float(mean),
            "units": int(factors.numel()),
            "pruned_units": int((factors < PRUNED_BELOW).sum()) if lam > 0 else 0,
            "pca_mode": layer.pca_mode if method == "pca-egem" else None,
            "patch": patch,
        })
    return layers


def _attach(model: nn.Module, layers: list[dict], alpha: float, method: str) -> list[str]:
    """Attach the layers' patches to `model`; returns their keys (only these are removed again)."""
    keys = []
    for layer in layers:
        if layer["patch"] is None:
            continue
        info = {"method": method, "alpha": float(alpha), "tau": layer["tau"], "lambda": layer["lambda"],
                "mean_factor": layer["mean_factor"]}
        if layer["pca_mode"] is not None:
            info["mode"] = layer["pca_mode"]
        keys.append(attach_patch(model, layer["name"], layer["patch"], info))
    return keys


# ---- fitting --------------------------------------------------------------------------------------------------


@dataclass
class EgemConfig:
    """What `fit_egem` needs; the CLI options map onto these fields one to one."""

    method: str = "egem"  # "egem" | "pca-egem" | "egem-full" (modelfix/repair/egem_full.py)
    layers: str | list[str] | None = None  # refinement points (names or globs); None: the family's defaults
    alpha: float | None = None  # given: used as is, no selection
    slack: float = 0.05
    slack_mode: str = "relative"
    schedule: str = "triangular"
    conv_mode: str = "sum"  # PCA-EGEM on conv maps: "sum" (paper code) | "position" (1×1 affine per position)
    grid: tuple[float, ...] = ALPHA_GRID
    batch_size: int = 256
    explainer: str = "gi"  # egem-full only: "gi" (gradient×input) | "lrp-eps" (zennit)
    counterfactual: Dataset | None = None  # given: α by the counterfactual rule (`counterfactual.py`), not by slack


def _check_alpha(alpha: float, option: str = "--alpha") -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise ModelfixError(f"{option} must be in (0, 1], got {alpha}",
                            hint="1 leaves the model unchanged; smaller values prune harder")
    return value


def check_config(config: EgemConfig) -> None:
    """Every option checked before the statistics pass, so a typo costs nothing."""
    if config.method not in METHODS:
        raise ModelfixError(f"unknown EGEM method '{config.method}'", hint=f"one of {', '.join(METHODS)}")
    if config.schedule not in SCHEDULES:
        raise ModelfixError(f"unknown --schedule '{config.schedule}'", hint=f"one of {', '.join(SCHEDULES)}")
    if config.conv_mode not in CONV_MODES:
        raise ModelfixError(f"unknown --pca-conv-mode '{config.conv_mode}'", hint=f"one of {', '.join(CONV_MODES)}")
    check_slack(config.slack, config.slack_mode)
    if config.alpha is not None:
        _check_alpha(config.alpha)
    elif not config.grid:
        raise ModelfixError("the α grid is empty", hint="give --alpha or at least one grid value")
    else:
        for alpha in config.grid:
            _check_alpha(alpha, "every α in the grid")
    if config.batch_size < 1:
        raise ModelfixError(f"--batch-size must be at least 1, got {config.batch_size}")


def _pca_warnings(stats: dict[str, LayerStats]) -> list[str]:
    """Warn where the centred covariance cannot have full rank (n unique samples span at most n − 1 directions); τ
    then targets the mean factor over the directions with variance only (`pca_mean_factor`)."""
    warnings = []
    for layer in stats.values():
        if layer.cov is None:
            continue
        d = layer.cov.shape[0]
        if layer.unique <= d:
            what = "positions" if layer.pca_mode == "position" else "samples"
            warnings.append(f"PCA-EGEM on '{layer.name}': only {layer.unique} unique {what} for {d} dims; "
                            "directions outside their span are removed and τ applies to the rest")
    return warnings


def _layer_rows(layers: list[dict]) -> list[dict]:
    return [{k: v for k, v in layer.items() if k != "patch"} for layer in layers]


def _grid_accuracies(refined: nn.Module, split: RefinementSplit, grid: list[float], candidates: list[list[dict]],
                     method: str, val_orig: float, batch_size: int, progress: bool,
                     cf: Dataset | None = None) -> list[float]:
    """Validation accuracy of each α's refinement (with `cf`: its counterfactual score, `score_model`, instead).
    The layers before the first point that any α patches do not depend on α (a point with τ ≥ 1 gets no patch:
    the triangular schedule's first point for every α < 1): on a Sequential net their output is computed once per
    batch and only the rest runs per α (`evaluate.predict_variants`; the same predictions as one
    `weighted_accuracy` or `score_model` pass per α). A candidate without any patch (every τ ≥ 1) is the original
    model: its score is `val_orig`, no pass."""
    net = refined.net
    tops = {layer["name"].split(".")[0] for layers in candidates for layer in layers if layer["patch"] is not None}
    names = list(net._modules) if isinstance(net, nn.Sequential) else []
    start = min((names.index(t) for t in tops), default=0) if tops and tops <= set(names) else 0

    def variant(alpha, layers):
        def apply():
            keys = _attach(refined, layers, alpha, method)
            return lambda: [remove_patch(refined, key) for key in keys]
        return apply

    patched = [i for i, layers in enumerate(candidates) if any(layer["patch"] is not None for layer in layers)]
    val = split.val if cf is None else cf
    with progress_bar(progress) as bar:
        task = bar.add_task(f"{method} α selection", total=(len(val) + batch_size - 1) // batch_size)
        preds = predict_variants(refined, val.x, [variant(grid[i], candidates[i]) for i in patched], start,
                                 batch_size, on_batch=lambda: bar.advance(task))
    counts = split.val_counts.double()
    accs = [val_orig] * len(grid)
    for i, pred in zip(patched, preds):
        accs[i] = (float(((pred == val.y).double() * counts).sum() / counts.sum()) if cf is None
                   else group_score(pred, cf))
    return accs


def fit_egem(
    model: nn.Module, split: RefinementSplit, config: EgemConfig, progress: bool = True
) -> tuple[nn.Module, dict]:
    """Refine a copy of `model` with EGEM or PCA-EGEM; returns `(patched copy, trace)`. `model` is not modified.

    Statistics: one pass over `split.fit` weighted by `split.fit_counts`. Selection (unless `config.alpha`): every
    α of the grid, weakest (1.0) first, is attached, scored on `split.val` weighted by `split.val_counts`, and
    removed; the strongest α within the slack of the original's validation accuracy wins (`select_by_slack`).
    """
    check_config(config)
    if config.method == "egem-full":
        from modelfix.repair.egem_full import fit_egem_full  # the LRP-weighted variant, with its own needs

        return fit_egem_full(model, split, config, progress)
    from modelfix.repair.points import find_points

    start = time.perf_counter()
    refined = copy.deepcopy(model).eval()
    points = list(find_points(refined, config.layers))
    if not points:
        raise UnsupportedModel("no refinement points found in the network", hint="name them with --layers")
    method = config.method
    stats = collect_stats(refined, split.fit, split.fit_counts, points, method == "pca-egem", config.conv_mode,
                          config.batch_size, progress)
    statistics_s = time.perf_counter() - start

    selection_start = time.perf_counter()
    val_orig = weighted_accuracy(refined, split.val, split.val_counts, config.batch_size)
    selection: list[dict] = []
    if config.alpha is None:
        grid = sorted({float(a) for a in config.grid}, reverse=True)  # weakest first
        cf_scores: list = []
        cf = config.counterfactual
        cf_orig = None if cf is None else score_model(refined, cf, config.batch_size)
        candidates = [build_refinement(stats, points, alpha, config.schedule, method) for alpha in grid]
        accs = _grid_accuracies(refined, split, grid, candidates, method, val_orig, config.batch_size,
                                progress)
        if cf is not None:  # the same shared passes over the counterfactual set
            cf_scores = _grid_accuracies(refined, split, grid, candidates, method, cf_orig,
                                         config.batch_size, progress, cf)
        index, selection = selection_table("alpha", grid, accs, val_orig, config.slack, config.slack_mode)
        if cf is not None:
            index = select_counterfactual(cf_scores, accs, val_orig, config.slack, config.slack_mode)
            for row, score in zip(selection, cf_scores):
                row.update(cf_worst=score.worst, cf_mean=score.mean)
        alpha, val_acc = grid[index], accs[index]
        selected_by = "slack" if cf is None else "counterfactual"
        layers = build_refinement(stats, points, alpha, config.schedule, method)
        _attach(refined, layers, alpha, method)
    else:
        alpha, selected_by = float(config.alpha), "given"
        layers = build_refinement(stats, points, alpha, config.schedule, method)
        keys = _attach(refined, layers, alpha, method)
        val_acc = weighted_accuracy(refined, split.val, split.val_counts, config.batch_size) if keys else val_orig
    selection_s = time.perf_counter() - selection_start

    trace = {
        "method": method,
        "points": [p.name for p in points],
        "schedule": config.schedule,
        "alpha": alpha,
        "selected_by": selected_by,
        "rule": (rule_name(config.slack, config.slack_mode) if config.counterfactual is not None and config.alpha is None
                 else None),
        "slack": float(config.slack),
        "slack_mode": config.slack_mode,
        "val_orig": val_orig,
        "val_acc": val_acc,
        "selection": selection,
        "layers": _layer_rows(layers),
        "samples": dict(split.summary),
        "warnings": list(split.summary.get("warnings", [])) + _pca_warnings(stats),
        "timing": {"statistics_s": statistics_s, "selection_s": selection_s,
                   "total_s": time.perf_counter() - start},
    }
    return refined, trace


# ---- registry entries (egem-full registers in egem_full.py) -----------------------------------------------------

PAPER = ('Linhardt, Müller, Montavon 2023/24, "Preemptively Pruning Clever-Hans Strategies in Deep Neural '
         'Networks"')
DEFAULTS = {"alpha": None, "slack": 0.05, "slack_mode": "relative", "schedule": "triangular", "layers": None,
            "samples_per_class": 700, "keep_incorrect": False, "min_relevance": None, "fold": None,
            "select": "counterfactual"}


def run_egem_family(inputs, method: str, **options):
    """Refinement split from `inputs.clean`, `fit_egem`, then the fold of what folds exactly (`fold`: None = what
    folds, True = all or an error, False = keep patches)."""
    from modelfix.repair.fold import fold_patches
    from modelfix.repair.patches import patch_entries
    from modelfix.repair.refinement import split_for_repair
    from modelfix.repair.result import slack_result

    config = EgemConfig(method=method, layers=options["layers"], alpha=options["alpha"], slack=options["slack"],
                        slack_mode=options["slack_mode"], schedule=options["schedule"],
                        conv_mode=options.get("conv_mode", "sum"), batch_size=inputs.batch_size,
                        explainer=options.get("explainer", "gi"))
    check_config(config)  # before the pool is predicted, so a typo costs nothing
    check_rule(options["select"])
    split = split_for_repair(inputs.model, inputs.clean, options["samples_per_class"], options["keep_incorrect"],
                             options["min_relevance"], inputs.seed, inputs.batch_size)
    config.counterfactual, rule, warnings = posthoc_counterfactual(inputs, split, options.get("select",
                                                                                           "counterfactual"))
    if method == "egem-full" and config.counterfactual is not None:  # its own α loop scores clean accuracy only
        config.counterfactual = None
        rule = f"slack {config.slack:g} ({config.slack_mode}); egem-full has no counterfactual rule"
    repaired, trace = fit_egem(inputs.model, split, config, inputs.progress)
    if rule is not None and config.alpha is None:
        trace["rule"] = rule
    trace.setdefault("warnings", []).extend(warnings)
    if patch_entries(repaired) and options["fold"] is not False:
        folded = fold_patches(repaired, strict=bool(options["fold"]))
        trace["fold"] = {"folded": folded.folded, "kept": folded.kept}
    if trace["alpha"] >= 1.0:
        trace.setdefault("warnings", []).append(
            "α = 1 was selected: the repaired model is the original (no unit was scaled); " + (
                "no stronger α within the validation-accuracy slack scored better on the counterfactual validation set"
                if trace.get("selected_by") == "counterfactual" else
                "the slack rule found no stronger α within the validation-accuracy slack"))
    return slack_result(repaired, "posthoc", trace, options, "alpha")


@method("egem", "posthoc", "scale each unit by E[a²]/(E[a²]+λ) on verified clean samples (Eq. 5)", PAPER, DEFAULTS,
        needs=("clean",), command="prune-egem")
def run_egem(inputs, **options):
    return run_egem_family(inputs, "egem", **options)


@method("pca-egem", "posthoc", "shrink PCA directions of the activations by σ²/(σ²+λ) (Eq. 6)", PAPER,
        {**DEFAULTS, "conv_mode": "sum"}, needs=("clean",), command="prune-egem")
def run_pca_egem(inputs, **options):
    return run_egem_family(inputs, "pca-egem", **options)
