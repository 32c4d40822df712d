"""`egem-full`: EGEM's explanation-weighted per-weight soft pruning (paper Eq. 4, Supp. B; notes §1.2, §1.4, §1.5b).
EXPERIMENTAL: the paper evaluates the per-unit rule (Eq. 5, `egem`), not this one.

For a consumer layer (Conv2d or Linear) with input activations `a_i` and output pre-activations `z_j`, the message
`R_ij = a_i·w_ij·d_j` of an explanation is kept close to the original while its sensitivity `w_ij·d_j` is
penalised; each weight is a 1-D quadratic with the closed form

    w_ij ← m_ij·w_ij,   m_ij = E[a_i² d_j²] / (E[a_i² d_j²] + λ·E[d_j²])  ∈ [0, 1]

over the approved refinement data. `d_j` is what the explainer multiplies by `a_i·w_ij`:

- `gi` (Gradient×Input, default): `d_j = ∂y/∂z_j`, plain autograd, no zennit;
- `lrp-eps`: the LRP ε rule on the consumers (`EpsilonPlusFlat` elsewhere, `zero_params='bias'`), for which
  `R_i = a_i Σ_j w_ij R_j/(z̃_j + ε·s(z̃_j))`, so `d_j = R_j/(z̃_j + ε·s(z̃_j))` with `z̃` the output without bias
  (as zennit recomputes it) and `s` its sign (+1 at 0).

`y` is the true-class logit. Conv layers use the per-image spatial sums of `a` and `d` (the reference
`WEGEMRefiner`), and one `m_ij` scales the whole kernel slice `W[j, i, :, :]`; this is exact only for stride-1
circular convolution, an approximation otherwise (paper). `m` does not change when `d_j` is rescaled per output
`j`, so a BN folded into the consumer by a canonizer does not change the result.

The result is a weight edit (a stock checkpoint, no patch). λ per layer and α are found as for EGEM (`egem.py`):
a triangular schedule of target mean multipliers, λ searched to reach each, α chosen by the slack rule.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelfix import distributed
from modelfix.data.dataset import Dataset
from modelfix.errors import DataError, ModelfixError, UnsupportedModel
from modelfix.explain.lrp import EPSILON, build_composite, explaining
from modelfix.progress import progress_bar
from modelfix.repair.egem import (DEFAULTS, PAPER, PRUNED_BELOW, check_config, run_egem_family, search_lambda,
                                  tau_schedule)
from modelfix.repair.registry import method
from modelfix.repair.refinement import RefinementSplit, weighted_accuracy
from modelfix.repair.selection import selection_table

EXPLAINERS = ("gi", "lrp-eps")
EXPERIMENTAL = ("egem-full is experimental: the paper evaluates the per-unit rule (Eq. 5, method egem); this is its "
                "per-weight form (Eq. 4) with Gradient×Input or LRP-ε statistics")


# ---- consumers ---------------------------------------------------------------------------------------------------


def _eligible(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _execution_order(model: nn.Module) -> list[tuple[str, int]]:
    """(name, calls) of every Conv2d/Linear in `model.net`, in the order of a dry run's first calls."""
    calls: dict[str, int] = {}
    handles = []
    for name, module in model.net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            def hook(module: nn.Module, args: object, output: object, name: str = name) -> None:
                calls[name] = calls.get(name, 0) + 1
            handles.append(module.register_forward_hook(hook))
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        spec = model.input_spec
        with torch.inference_mode():
            model(torch.zeros(1, spec.channels, spec.height, spec.width, device=model.mean.device))
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in training.items():
            m.training = flag
    return list(calls.items())


def find_consumers(model: nn.Module, layers: str | Sequence[str] | None = None) -> list[str]:
    """The layers whose weights egem-full edits, in execution order (from a dry run).

    Default (`None`/"auto"): every Conv2d/Linear except the first (the input layer has no activations to prune),
    skipping grouped convs and modules run more than once per forward pass. Otherwise module names or globs (a
    string may list them comma-separated); each must be a Conv2d with groups=1 or a Linear that runs once.
    """
    order = _execution_order(model)
    modules = dict(model.net.named_modules())
    if layers is None or layers == "auto":
        chosen = [name for name, calls in order[1:] if calls == 1 and _eligible(modules[name])]
        if not chosen:
            raise UnsupportedModel("egem-full found no Conv2d/Linear layer after the input layer to edit",
                                   hint="name the layers with --layers")
        return chosen
    patterns = [p.strip() for p in layers.split(",")] if isinstance(layers, str) else [str(p) for p in layers]
    calls = dict(order)
    chosen = set()
    for pattern in patterns:
        matches = [name for name in modules if name and fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise ModelfixError(f"--layers '{pattern}' matches no module in the network",
                                hint="list the names with `modelfix inspect`")
        if pattern in modules:  # an exact name must itself be usable
            matches = [pattern]
            if not _eligible(modules[pattern]):
                raise UnsupportedModel(f"egem-full cannot edit '{pattern}' ({type(modules[pattern]).__name__})",
                                       hint="--layers must name Conv2d (groups=1) or Linear layers")
        else:
            matches = [name for name in matches if _eligible(modules[name])]
            if not matches:
                raise UnsupportedModel(f"--layers '{pattern}' matches no Conv2d (groups=1) or Linear layer",
                                       hint="egem-full edits the weights of such layers")
        for name in matches:
            if calls.get(name, 0) != 1:
                raise UnsupportedModel(f"egem-full cannot edit '{name}': it runs {calls.get(name, 0)} times per "
                                       "forward pass", hint="name a layer that runs exactly once")
        chosen.update(matches)
    return [name for name, _ in order if name in chosen]


# ---- per-batch signals ----------------------------------------------------------------------------------------


class Signals(NamedTuple):
    """One batch at one consumer: its input `a`, the explainer's `d` at its output, and (if asked) the gradient
    arriving at its input tensor (under `lrp-eps` the relevance `R_i`, under `gi` `∂y/∂a_i`)."""

    a: Tensor
    d: Tensor
    input_grad: Tensor | None


def _stabilised(z: Tensor) -> Tensor:
    """zennit's default stabiliser of the ε rule: `z + ε·s(z)` with `s(0) = +1`."""
    return z + EPSILON * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def _without_bias(module: nn.Module, a: Tensor) -> Tensor:
    """The module's output with its bias left out (what zennit's `zero_params='bias'` rule divides by)."""
    if isinstance(module, nn.Linear):
        return F.linear(a, module.weight)
    return module._conv_forward(a, module.weight, None)


@contextlib.contextmanager
def probe_consumers(model: nn.Module, consumers: Sequence[str], explainer: str = "gi",
                    input_grad: bool = False) -> Iterator[Callable[[Tensor, Tensor], dict[str, Signals]]]:
    """A function `run(x, y) -> {consumer: Signals}` explaining the true-class logit of pixel batch `x`.

    zennit's rules and canonizers (for `lrp-eps`) are registered once for the whole block, our capture hooks after
    them (notes §8.5); everything is removed on exit, also on error. The pre-hook runs before zennit's (prepend),
    so it sees the consumer's real input tensor rather than zennit's copy: the gradient there is the rule's output.
    """
    if explainer not in EXPLAINERS:
        raise ModelfixError(f"unknown --explainer '{explainer}'", hint=f"one of {', '.join(EXPLAINERS)}")
    with explaining(model) as view, contextlib.ExitStack() as stack:
        if explainer == "lrp-eps":  # zennit only here: importing it costs about 2 s (it imports torchvision)
            from zennit.rules import Epsilon

            rules = {f"net.{name}": Epsilon(epsilon=EPSILON, zero_params="bias") for name in consumers}
            stack.enter_context(build_composite(model, "epsilon_plus_flat", True, rules).context(view))
        store: dict[str, dict[str, Tensor]] = {}

        def pre_hook(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                a = args[0]
                store[name] = {"a": a.detach().clone()}
                if input_grad and a.requires_grad:
                    a.register_hook(lambda g: store[name].__setitem__("input_grad", g.detach()))
            return hook

        def post_hook(name: str):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:  # returns None: output unchanged
                entry = store[name]
                if explainer == "lrp-eps":
                    with torch.no_grad():
                        entry["zt"] = _without_bias(module, args[0].detach())
                if output.requires_grad:
                    output.register_hook(lambda g: entry.__setitem__("grad", g.detach()))
            return hook

        for name in consumers:
            module = model.net.get_submodule(name)
            stack.callback(module.register_forward_pre_hook(pre_hook(name), prepend=True).remove)
            stack.callback(module.register_forward_hook(post_hook(name)).remove)

        def run(x: Tensor, y: Tensor) -> dict[str, Signals]:
            store.clear()
            z = ((x.to(model.mean.device) - model.mean) / model.std).detach().clone().requires_grad_(True)
            out = view(z)
            seed = F.one_hot(y.to(out.device), out.shape[1]).to(out.dtype)
            if explainer == "lrp-eps":
                seed = seed * out.detach()  # relevance starts at the logit's value; GI takes ∂y/∂z itself
            torch.autograd.grad(out, z, seed)
            signals = {}
            for name in consumers:
                entry = store.get(name)
                if entry is None or "grad" not in entry:
                    raise UnsupportedModel(f"egem-full: '{name}' did not take part in the explained forward pass")
                d = entry["grad"] if explainer == "gi" else entry["grad"] / _stabilised(entry["zt"])
                signals[name] = Signals(entry["a"], d, entry.get("input_grad"))
            return signals

        yield run


# ---- statistics ------------------------------------------------------------------------------------------------


def full_stats(model: nn.Module, data: Dataset, counts: Tensor, consumers: list[str], explainer: str = "gi",
               batch_size: int = 64, progress: bool = True) -> dict[str, tuple[Tensor, Tensor]]:
    """Per consumer `(AD, D)` summed over the fit samples, each weighted by its count (float64, CPU):

    `AD[i, j] = Σ_n w_n a_s[n,i]² d_s[n,j]²` (`d_in × d_out`), `D[j] = Σ_n w_n d_s[n,j]²`, where for conv maps
    `a_s`, `d_s` are spatial sums and for dense layers the values themselves. (Sums, not means: `m` is a ratio.)
    Accumulated in place per batch; no per-sample matrix is stored. Under torchrun each process sums its block of
    whole batches and the float64 sums of every process are added.
    """
    counts = torch.as_tensor(counts).reshape(-1)
    if len(counts) != len(data):
        raise ValueError(f"{len(counts)} counts for {len(data)} samples")
    active = torch.nonzero(counts > 0).flatten()
    if len(active) == 0:
        raise DataError("egem-full: no fit sample has a positive count")
    totals: dict[str, tuple[Tensor, Tensor]] = {}
    rows = distributed.batch_block(len(active), batch_size)  # under torchrun: this process's whole batches
    with probe_consumers(model, consumers, explainer) as run, progress_bar(progress) as bar:
        task = bar.add_task(f"egem-full statistics ({explainer})", total=len(rows))
        for start in range(rows.start, rows.stop, batch_size):
            idx = active[start : min(start + batch_size, rows.stop)]
            signals = run(data.x[idx], data.y[idx])
            w = counts[idx].to(torch.float64)
            for name, (a, d, _) in signals.items():
                a, d = _summaries(name, a), _summaries(name, d)
                a2w = a.square() * w[:, None]
                d2 = d.square()
                if name not in totals:
                    totals[name] = (torch.zeros(a.shape[1], d.shape[1], dtype=torch.float64),
                                    torch.zeros(d.shape[1], dtype=torch.float64))
                ad, dd = totals[name]
                ad.addmm_(a2w.T, d2)
                dd.add_(w @ d2)
            bar.advance(task, len(idx))
    merged: dict[str, tuple[Tensor, Tensor]] = {}
    for part in distributed.gather_objects(totals):  # every process's float64 sums, added in rank order
        for name, (ad, dd) in part.items():
            if name in merged:
                merged[name] = (merged[name][0] + ad, merged[name][1] + dd)
            else:
                merged[name] = (ad, dd)
    return merged


def _summaries(name: str, t: Tensor) -> Tensor:
    """`N × units` float64 on the CPU: spatial sums of conv maps, dense vectors as they are."""
    t = t.detach().to("cpu", torch.float64)
    if t.ndim == 4:
        return t.sum(dim=(2, 3))
    if t.ndim != 2:
        raise UnsupportedModel(f"egem-full: '{name}' sees a {t.ndim}-d tensor; only N×C×H×W and N×D are supported")
    return t


def full_multipliers(AD: Tensor, D: Tensor, lam: float) -> Tensor:
    """`m[i, j] = AD[i,j] / (AD[i,j] + λ·D[j])` (paper Eq. 4), 0 where `AD = 0` (no explained flow through the
    weight, which covers 0/0)."""
    AD = AD.to(torch.float64)
    D = D.to(torch.float64)
    denominator = AD + lam * D[None, :]
    return torch.where(AD > 0, AD / torch.where(AD > 0, denominator, torch.ones_like(denominator)),
                       torch.zeros_like(AD))


def _ratio(AD: Tensor, D: Tensor) -> Tensor:
    """`r = AD/D` (0 where AD = 0): `m = r/(r + λ)`, cheaper to evaluate many times in the λ search."""
    return torch.where(AD > 0, AD / torch.where(D > 0, D, torch.ones_like(D))[None, :], torch.zeros_like(AD))


def _multipliers_from_ratio(r: Tensor, lam: float) -> Tensor:
    return torch.where(r > 0, r / (r + lam), torch.zeros_like(r))


def apply_multipliers(module: nn.Module, m: Tensor) -> None:
    """`W[j, i, …] ← m[i, j]·W[j, i, …]` in place (the bias is not part of Eq. 4 and stays)."""
    with torch.no_grad():
        factor = m.T.to(module.weight.dtype).to(module.weight.device)
        module.weight.mul_(factor.reshape(*factor.shape, *([1] * (module.weight.ndim - 2))))


# ---- fitting --------------------------------------------------------------------------------------------------


def _plan(ratios: dict[str, Tensor], consumers: list[str], alpha: float, schedule: str) -> list[dict]:
    """Per consumer: τ from the schedule, λ searched so that the mean of `m` over all (i, j) reaches τ, and `m`
    (None where τ ≥ 1: the layer is left as it is)."""
    layers = []
    for name, tau in zip(consumers, tau_schedule(alpha, len(consumers), schedule)):
        r = ratios[name]
        scale = float(r.max()) if r.numel() else 0.0
        lam, mean = search_lambda(lambda l: float(_multipliers_from_ratio(r, l).mean()), tau, scale)
        m = _multipliers_from_ratio(r, lam) if lam > 0 else None
        layers.append({
            "name": name,
            "kind": "weights",
            "tau": float(tau),
            "lambda": float(lam),
            "mean_factor": float(mean),
            "units": int(r.numel()),
            "pruned_units": int((m < PRUNED_BELOW).sum()) if m is not None else 0,
            "m": m,
        })
    return layers


@contextlib.contextmanager
def _applied(model: nn.Module, layers: list[dict]) -> Iterator[None]:
    """The plan's multipliers on `model`'s weights for the block; the original weights are restored after."""
    saved = {}
    try:
        for layer in layers:
            if layer["m"] is not None:
                module = model.net.get_submodule(layer["name"])
                saved[layer["name"]] = module.weight.detach().clone()
                apply_multipliers(module, layer["m"])
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                model.net.get_submodule(name).weight.copy_(weight)


def fit_egem_full(model: nn.Module, split: RefinementSplit, config, progress: bool = True) -> tuple[nn.Module, dict]:
    """Refine a copy of `model` by egem-full; returns `(edited copy, trace)`. `model` is not modified.

    `config` is an `egem.EgemConfig` (`layers`, `alpha`, `slack`, `slack_mode`, `schedule`, `grid`,
    `batch_size`) plus an optional `explainer` ("gi" | "lrp-eps"). Statistics: one explained pass over
    `split.fit` weighted by `split.fit_counts`. Unless `config.alpha` is given, every α of the grid (weakest
    first) is applied to the weights, scored on `split.val` weighted by `split.val_counts`, and undone; the
    strongest α within the slack wins (`select_by_slack`).
    """
    check_config(config)
    explainer = getattr(config, "explainer", None) or "gi"
    if explainer not in EXPLAINERS:
        raise ModelfixError(f"unknown --explainer '{explainer}'", hint=f"one of {', '.join(EXPLAINERS)}")
    start = time.perf_counter()
    refined = copy.deepcopy(model).eval()
    consumers = find_consumers(refined, config.layers)
    stats = full_stats(refined, split.fit, split.fit_counts, consumers, explainer, config.batch_size, progress)
    ratios = {name: _ratio(*stats.pop(name)) for name in consumers}  # AD is dropped as soon as r exists
    statistics_s = time.perf_counter() - start

    selection_start = time.perf_counter()
    val_orig = weighted_accuracy(refined, split.val, split.val_counts, config.batch_size)
    selection: list[dict] = []
    if config.alpha is None:
        grid = sorted({float(a) for a in config.grid}, reverse=True)  # weakest first
        accs = []
        with progress_bar(progress) as bar:
            task = bar.add_task("egem-full α selection", total=len(grid))
            for alpha in grid:
                layers = _plan(ratios, consumers, alpha, config.schedule)
                if any(layer["m"] is not None for layer in layers):
                    with _applied(refined, layers):
                        accs.append(weighted_accuracy(refined, split.val, split.val_counts, config.batch_size))
                else:
                    accs.append(val_orig)
                bar.advance(task)
        index, selection = selection_table("alpha", grid, accs, val_orig, config.slack, config.slack_mode)
        alpha, val_acc, selected_by = grid[index], accs[index], "slack"
        layers = _plan(ratios, consumers, alpha, config.schedule)
    else:
        alpha, selected_by = float(config.alpha), "given"
        layers = _plan(ratios, consumers, alpha, config.schedule)
        val_acc = None
    for layer in layers:
        if layer["m"] is not None:
            apply_multipliers(refined.net.get_submodule(layer["name"]), layer["m"])
    if val_acc is None:
        val_acc = weighted_accuracy(refined, split.val, split.val_counts, config.batch_size)
    selection_s = time.perf_counter() - selection_start

    trace = {
        "method": "egem-full",
        "explainer": explainer,
        "points": consumers,
        "schedule": config.schedule,
        "alpha": alpha,
        "selected_by": selected_by,
        "slack": float(config.slack),
        "slack_mode": config.slack_mode,
        "val_orig": val_orig,
        "val_acc": val_acc,
        "selection": selection,
        "layers": [{k: v for k, v in layer.items() if k != "m"} for layer in layers],
        "samples": dict(split.summary),
        "warnings": [EXPERIMENTAL],
        "timing": {"statistics_s": statistics_s, "selection_s": selection_s,
                   "total_s": time.perf_counter() - start},
    }
    return refined, trace


@method("egem-full", "posthoc", "EXPERIMENTAL: explanation-weighted per-weight soft pruning (Eq. 4)", PAPER,
        {**DEFAULTS, "explainer": "gi"}, needs=("clean",), command="prune-egem")
def run_egem_full(inputs, **options):
    return run_egem_family(inputs, "egem-full", **options)
