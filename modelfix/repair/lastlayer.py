"""RGEM and Ridge: closed-form float64 refits of the last Linear layer (EGEM paper Supp. D Eq. 24–26 and §4.2;
notes §0.7, §4.1, §4.2).

Both fit `fc: W (K×d), b (K)` on the penultimate features `A` (the input of the last nn.Linear) of the refinement
fit split, by weighted ridge regression with an unpenalised bias, all K outputs in one solve:

    minimise_W,b  Σ_i w_i ‖W a_i + b − t_i‖² / Σ_i w_i  +  λ_abs ‖W‖²_F

- `rgem`: the targets are the original logits, `t_i = W_old a_i + b_old` (the student reproduces the teacher on the
  verified data; without bias this is the paper's `w = (Σ + λI)⁻¹ Σ w_old`), so λ → 0 is the original layer;
- `ridge`: the targets are one-hot labels (linear probing / DFR style); its grid has no identity.

λ is relative: `λ_abs = λ · m2` with `m2` the features' mean second moment (see `ridge_solve`), so the grid
{1e-4 … 1e4} (notes §3.3) means the same for any feature scale. λ is chosen on the validation split by the slack
rule (§3.4), small λ = weak. Features are computed once per split (2 forward passes in all): validation logits for
every λ are `A_val W_newᵀ + b_new`, with no further forward pass.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from modelfix import distributed
from modelfix.data.dataset import Dataset
from modelfix.errors import DataError, ModelfixError, UnsupportedModel
from modelfix.progress import progress_bar
from modelfix.repair.counterfactual import (check_rule, group_score, posthoc_counterfactual, rule_name,
                                            select_counterfactual)
from modelfix.repair.refinement import RefinementSplit
from modelfix.repair.registry import method
from modelfix.repair.selection import check_slack, selection_table
from modelfix.zoo import last_linear

LAMBDA_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)  # weakest first; relative to the mean second moment
METHODS = ("rgem", "ridge")


# ---- features ---------------------------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), torch.zeros(()))
    return tensor.device


def _capture(model: nn.Module, data: Dataset, batch_size: int, progress: bool,
             description: str) -> tuple[Tensor, Tensor]:
    """One pass over `data`: (penultimate features, model logits), both float64 on the CPU.

    A forward pre-hook on the last Linear of `model.net` takes its input; a forward hook takes a *copy* of its
    output (an in-place op after it, e.g. ReLU(inplace=True), would otherwise change what is compared). Every batch
    checks that the model's logits are exactly that output, i.e. the Linear is the final operation: otherwise a refit
    of it would not be a refit of the logits, and the model is refused. Eval mode (restored after),
    `inference_mode`; hooks removed in `finally`.

    Under torchrun each process runs its block of the items (`distributed.shard_indices`) and the blocks are
    concatenated in rank order, so every process holds the one-process features and logits: the ridge moments, the
    λ grid and the selection that follow are then the one-process computation (the rows are n×d float64, which one
    process holds anyway).
    """
    name, layer = last_linear(model.net)
    seen: dict[str, list[Tensor]] = {"in": [], "out": []}

    def pre_hook(module: nn.Module, args: tuple) -> None:
        seen["in"].append(args[0].detach().to(torch.float64, copy=True))

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        seen["out"].append(output.detach().clone())

    device = _device(model)
    features, logits = [], []
    was_training = model.training
    handles = [layer.register_forward_pre_hook(pre_hook), layer.register_forward_hook(hook)]
    try:
        model.eval()
        with torch.inference_mode(), progress_bar(progress) as bar:
            rows = distributed.shard_indices(len(data))
            task = bar.add_task(description, total=len(rows))
            for start in range(rows.start, rows.stop, batch_size):
                seen["in"].clear()
                seen["out"].clear()
                out = model(data.x[start : min(start + batch_size, rows.stop)].to(device))
                if len(seen["in"]) != 1:
                    raise UnsupportedModel(f"the last linear layer '{name}' ran {len(seen['in'])} times in one "
                                           "forward pass; a last-layer refit needs it to run once")
                if not (isinstance(out, Tensor) and out.shape == seen["out"][0].shape
                        and torch.equal(out, seen["out"][0])):
                    raise UnsupportedModel(
                        f"the last linear layer '{name}' is not the model's final operation (its output is not the "
                        "logits)", hint="rgem/ridge refit a classifier that ends in nn.Linear; use prune-egem instead")
                a = seen["in"][0]
                if a.dim() != 2:
                    raise UnsupportedModel(f"the last linear layer '{name}' gets a {a.dim()}-d input; a last-layer "
                                           "refit needs one feature vector per sample")
                features.append(a.cpu())
                logits.append(out.detach().to(torch.float64).cpu())
                bar.advance(task, len(a))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    d, k = layer.in_features, layer.out_features
    if not features:
        features, logits = [torch.zeros(0, d, dtype=torch.float64)], [torch.zeros(0, k, dtype=torch.float64)]
    return distributed.concat_shards(torch.cat(features)), distributed.concat_shards(torch.cat(logits))


def penultimate_features(model: nn.Module, data: Dataset, batch_size: int = 256, progress: bool = True) -> Tensor:
    """The input of the last nn.Linear of `model.net` (`zoo.last_linear`) for every item of `data`: float64, n×d.

    Captured by a forward pre-hook in eval mode under `inference_mode`; the hooks are removed in `finally`. Raises
    UnsupportedModel when that Linear is not the model's final operation (see `_capture`).
    """
    return _capture(model, data, batch_size, progress, "last-layer features")[0]


# ---- the ridge solve -------------------------------------------------------------------------------------------


@dataclass
class RidgeMoments:
    """The weighted moments a ridge fit needs, all float64; independent of λ, so a λ grid costs one solve each.

    With `intercept`, `cov` and `cross` are centred (`(A−μ)ᵀ diag(w) (A−μ)/n`, `(A−μ)ᵀ diag(w) (T−T̄)/n`);
    without, they are uncentred and `mean`/`target_mean` are zero. `n = Σ w`. `second_moment` is the scale λ is
    relative to: `trace(E_w[a aᵀ])/d`, the mean over the d features of the UNCENTRED weighted second moment
    `Σ_i w_i a_ij² / Σ_i w_i` (also with the intercept).
    """

    n: float
    mean: Tensor
    target_mean: Tensor
    cov: Tensor
    cross: Tensor
    second_moment: float


def ridge_moments(features: Tensor, targets: Tensor, weights: Tensor, intercept: bool = True) -> RidgeMoments:
    """Weighted means, (centred) covariance, cross-covariance with the targets and the mean second moment."""
    a = torch.as_tensor(features).to(torch.float64)
    t = torch.as_tensor(targets).to(torch.float64)
    w = torch.as_tensor(weights).to(torch.float64).reshape(-1)
    if a.dim() != 2 or t.dim() != 2 or len(a) != len(t) or len(w) != len(a):
        raise ValueError(f"features n×d, targets n×K and weights n must agree; got {tuple(a.shape)}, "
                         f"{tuple(t.shape)}, {tuple(w.shape)}")
    if bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError("weights must be non-negative with a positive sum")
    n = float(w.sum())
    second_moment = float((w @ a.square()).sum()) / (n * a.shape[1]) if a.shape[1] else 0.0
    if intercept:
        mean, target_mean = (w @ a) / n, (w @ t) / n
    else:
        mean, target_mean = a.new_zeros(a.shape[1]), t.new_zeros(t.shape[1])
    ac, tc = a - mean, t - target_mean
    weighted = ac * w[:, None]
    cov = weighted.T @ ac / n
    return RidgeMoments(n=n, mean=mean, target_mean=target_mean, cov=(cov + cov.T) / 2, cross=weighted.T @ tc / n,
                        second_moment=second_moment)


def lambda_absolute(moments: RidgeMoments, lam: float) -> float:
    """`λ_abs = λ · m2` (m2 = mean second moment). Features that are all zero (m2 = 0) take λ itself: there is
    nothing to fit, the solve gives W = 0 for any positive penalty."""
    return float(lam) * moments.second_moment if moments.second_moment > 0 else float(lam)


def solve_moments(moments: RidgeMoments, lam: float) -> tuple[Tensor, Tensor]:
    """`(W_new K×d, b_new K)` for relative penalty `lam > 0`: `W_newᵀ = (Cov + λ_abs I)⁻¹ C`, `b = T̄ − W_new μ`.

    Cov + λ_abs·I is positive definite for λ_abs > 0 even where Cov is singular (dead ReLUs, fewer samples than
    features), so a Cholesky solve serves; should rounding still defeat it (λ far below float64 resolution of Cov),
    a least-squares solve takes over.
    """
    if not float(lam) > 0:
        raise ValueError(f"the ridge penalty must be positive, got {lam}")
    d = moments.cov.shape[0]
    system = moments.cov + lambda_absolute(moments, lam) * torch.eye(d, dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        solution = torch.cholesky_solve(moments.cross, factor)
    else:
        solution = torch.linalg.lstsq(system, moments.cross, driver="gelsd").solution
    weight = solution.T.contiguous()
    return weight, moments.target_mean - weight @ moments.mean


def ridge_solve(features: Tensor, targets: Tensor, weights: Tensor, lam: float,
                intercept: bool = True) -> tuple[Tensor, Tensor]:
    """Weighted closed-form ridge regression with an unpenalised bias, in float64: `(W_new K×d, b_new K)`.

    `weights` are the oversampling multiplicities (item i counts `weights[i]` times, exactly as if duplicated). With
    `n = Σw`, `μ`, `T̄` the weighted means of features and targets:

        Cov = (A−μ)ᵀ diag(w) (A−μ) / n
        W_newᵀ = (Cov + λ_abs I)⁻¹ (A−μ)ᵀ diag(w) (T−T̄) / n ,    b_new = T̄ − W_new μ

    which equals the normal equations of the augmented system `[A, 1]` with penalty `diag(λ_abs, …, λ_abs, 0)` (an
    unpenalised intercept is the same as centring). The penalty is relative: `λ_abs = lam · m2`, where
    `m2 = trace(E_w[a aᵀ]) / d = (1/d) Σ_j Σ_i w_i a_ij² / Σ_i w_i` is the mean UNCENTRED weighted second moment of
    the features. Scaling the features by s scales Cov and m2 by s², so the fitted predictions do not depend on the
    features' scale and the grid means the same for every model. `intercept=False` (a bias-free Linear) fits
    `W` alone with uncentred moments and returns `b = 0`.
    """
    return solve_moments(ridge_moments(features, targets, weights, intercept), lam)


# ---- fitting ----------------------------------------------------------------------------------------------------


@dataclass
class RefitConfig:
    """What `fit_refit` needs; the CLI options map onto these fields one to one."""

    method: str = "rgem"  # "rgem" (original logits) | "ridge" (one-hot labels)
    lam: float | None = None  # given (relative, > 0): used as is, no selection
    slack: float = 0.05
    slack_mode: str = "relative"
    grid: tuple[float, ...] = LAMBDA_GRID
    batch_size: int = 256
    counterfactual: Dataset | None = None  # given: λ by the counterfactual rule (`counterfactual.py`), not by slack


def _check_lambda(value: float, option: str) -> float:
    try:
        lam = float(value)
    except (TypeError, ValueError):
        lam = float("nan")
    if not (lam > 0 and lam < float("inf")):  # NaN fails too
        raise ModelfixError(f"{option} must be a positive number, got {value}",
                            hint="it is relative to the mean feature second moment; the grid runs 1e-4 to 1e4")
    return lam


def check_config(config: RefitConfig) -> None:
    """Every option checked before any forward pass, so a typo costs nothing."""
    if config.method not in METHODS:
        raise ModelfixError(f"--method must be one of {', '.join(METHODS)}, not '{config.method}'")
    check_slack(config.slack, config.slack_mode)
    if config.lam is not None:
        _check_lambda(config.lam, "--lambda")
    elif not config.grid:
        raise ModelfixError("the λ grid is empty", hint="give --lambda or at least one grid value")
    else:
        for lam in config.grid:
            _check_lambda(lam, "every λ in the grid")
    if config.batch_size < 1:
        raise ModelfixError(f"--batch-size must be at least 1, got {config.batch_size}")


def _weighted_accuracy(logits: Tensor, labels: Tensor, counts: Tensor) -> float:
    correct = (logits.argmax(1) == labels).double()
    counts = counts.double()
    return float((correct * counts).sum() / counts.sum())


def _targets(method: str, features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """RGEM: the original logits `A W_oldᵀ + b_old` in float64; Ridge: one-hot labels over the K outputs."""
    k = weight.shape[0]
    if method == "rgem":
        w_old = weight.detach().to(device="cpu", dtype=torch.float64)
        b_old = torch.zeros(k, dtype=torch.float64) if bias is None else bias.detach().to("cpu", torch.float64)
        return features @ w_old.T + b_old
    if len(labels) and int(labels.max()) >= k:
        raise DataError(f"label {int(labels.max())} in the refinement data, but the model has only {k} outputs",
                        hint="the clean data must use the model's classes")
    return torch.nn.functional.one_hot(labels, k).to(torch.float64)


def fit_refit(model: nn.Module, split: RefinementSplit, config: RefitConfig,
              progress: bool = True) -> tuple[nn.Module, dict]:
    """Refit the last Linear of a copy of `model` with RGEM or Ridge; returns `(copy, trace)`. `model` is unchanged.

    Two feature passes: `split.fit` (weighted by `split.fit_counts`) for the fit, `split.val` for the selection and
    the original model's validation accuracy `val_orig` (from the logits of the same pass). Unless `config.lam` is
    given, every λ of the grid, weakest (smallest) first, is solved and scored on `A_val W_newᵀ + b_new` weighted by
    `split.val_counts`; the strongest λ within the slack of `val_orig` wins (`select_by_slack`; if none passes, the
    weakest, as Ridge has no identity). W_new, b_new are written into the copy's last Linear in the layer's dtype.
    """
    check_config(config)
    start = time.perf_counter()
    refit = copy.deepcopy(model).eval()
    name, layer = last_linear(refit.net)  # UnsupportedModel if there is none
    method = config.method
    fit_features, _ = _capture(refit, split.fit, config.batch_size, progress, f"{method} features (fit)")
    val_features, val_logits = _capture(refit, split.val, config.batch_size, progress, f"{method} features (val)")
    targets = _targets(method, fit_features, split.fit.y, layer.weight, layer.bias)
    moments = ridge_moments(fit_features, targets, split.fit_counts, intercept=layer.bias is not None)
    features_s = time.perf_counter() - start

    selection_start = time.perf_counter()
    val_orig = _weighted_accuracy(val_logits, split.val.y, split.val_counts)

    def score(weight: Tensor, bias: Tensor) -> float:
        return _weighted_accuracy(val_features @ weight.T + bias, split.val.y, split.val_counts)

    selection: list[dict] = []
    if config.lam is None:
        grid = sorted({float(lam) for lam in config.grid})  # weakest (smallest) first
        cf = config.counterfactual
        if cf is not None:  # one more feature pass; every λ's predictions there are a product, as on validation
            cf_features, _ = _capture(refit, cf, config.batch_size, progress, f"{method} features (counterfactual)")
        solutions = []
        for lam in grid:
            weight, bias = solve_moments(moments, lam)
            solutions.append((weight, bias, score(weight, bias)))
        accs = [acc for _, _, acc in solutions]
        index, selection = selection_table("lambda", grid, accs, val_orig, config.slack, config.slack_mode)
        selected_by = "slack"
        if cf is not None:
            cf_scores = [group_score((cf_features @ w.T + b).argmax(1), cf) for w, b, _ in solutions]
            index = select_counterfactual(cf_scores, accs, val_orig, config.slack, config.slack_mode)
            for row, value in zip(selection, cf_scores):
                row.update(cf_worst=value.worst, cf_mean=value.mean)
            selected_by = "counterfactual"
        lam = grid[index]
        weight, bias, val_acc = solutions[index]
    else:
        lam, selected_by = float(config.lam), "given"
        weight, bias = solve_moments(moments, lam)
        val_acc = score(weight, bias)
    absent = sorted(set(range(layer.weight.shape[0])) - set(split.fit.y.tolist()))
    if method == "ridge" and absent:  # one-hot targets of 0 for a class never seen: it would never be predicted again
        weight[absent] = layer.weight.detach()[absent].to("cpu", torch.float64)
        if layer.bias is not None:
            bias[absent] = layer.bias.detach()[absent].to("cpu", torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight.to(dtype=layer.weight.dtype, device=layer.weight.device))
        if layer.bias is not None:
            layer.bias.copy_(bias.to(dtype=layer.bias.dtype, device=layer.bias.device))
    selection_s = time.perf_counter() - selection_start

    trace = {
        "method": method,
        "layer": name,
        "lambda": lam,
        "lambda_abs": lambda_absolute(moments, lam),
        "selected_by": selected_by,
        "rule": rule_name(config.slack, config.slack_mode) if selected_by == "counterfactual" else None,
        "slack": float(config.slack),
        "slack_mode": config.slack_mode,
        "val_orig": val_orig,
        "val_acc": val_acc,
        "selection": selection,
        "samples": dict(split.summary),
        "warnings": list(split.summary.get("warnings", [])) + ([
            f"ridge kept the original head rows of class(es) {absent}: no clean sample of them to fit"]
            if method == "ridge" and absent else []),
        "timing": {"features_s": features_s, "selection_s": selection_s, "total_s": time.perf_counter() - start},
    }
    return refit, trace


# ---- registry entries -----------------------------------------------------------------------------------------

PAPER = ('Linhardt, Müller, Montavon 2023/24, "Preemptively Pruning Clever-Hans Strategies in Deep Neural '
         'Networks"')
DEFAULTS = {"lam": None, "slack": 0.05, "slack_mode": "relative", "samples_per_class": 700, "keep_incorrect": False,
            "select": "counterfactual"}


def run_refit(inputs, method: str, **options):
    """Refinement split from `inputs.clean`, then `fit_refit`. A class with no sample in the split cannot be fitted:
    its row of the head is left as it was, and the result says so."""
    from modelfix.repair.refinement import split_for_repair
    from modelfix.repair.result import slack_result

    config = RefitConfig(method=method, lam=options["lam"], slack=options["slack"], slack_mode=options["slack_mode"],
                         batch_size=inputs.batch_size)
    check_config(config)
    check_rule(options["select"])
    last_linear(getattr(inputs.model, "net", inputs.model))  # a model without a linear head fails before any pass
    split = split_for_repair(inputs.model, inputs.clean, options["samples_per_class"], options["keep_incorrect"],
                             seed=inputs.seed, batch_size=inputs.batch_size)
    config.counterfactual, rule, warnings = posthoc_counterfactual(inputs, split, options["select"])
    repaired, trace = fit_refit(inputs.model, split, config, inputs.progress)
    if rule is not None and config.lam is None:
        trace["rule"] = rule
    trace["warnings"].extend(warnings)
    return slack_result(repaired, "posthoc", trace, options, "lambda")


@method("rgem", "posthoc", "ridge refit of the last linear layer to the original logits (Supp. D)", PAPER, DEFAULTS,
        needs=("clean",), command="refit")
def run_rgem(inputs, **options):
    return run_refit(inputs, "rgem", **options)


@method("ridge", "posthoc", "ridge refit of the last linear layer to one-hot labels (§4.2)", PAPER, DEFAULTS,
        needs=("clean",), command="refit")
def run_ridge(inputs, **options):
    return run_refit(inputs, "ridge", **options)
