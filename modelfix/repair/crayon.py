"""CRAYON-PRUNING (methods_posthoc.md §6.3 steps 5–6): drop the feature channels a human judged irrelevant ("no")
and fine-tune only the last Linear layer.

The pruned layer's output feeds the last nn.Linear through flatten / average-pooling / ReLU only, so masking
channel j (`A_j ← 0·A_j`) is exactly zeroing the Linear's input columns that channel owns: columns
j·H·W … (j+1)·H·W−1 for a flattened C×H×W map, column j for a globally average-pooled map or a dense layer
(ReLU(0) = 0 and the mean of zeros is 0). That is the fold: the result is a stock-architecture model. The columns
stay zero during the fine-tune (their gradient is zeroed, so Adam never moves them); the head trains in the one
training loop (`modelfix.training.train`) on the cached features.

The fine-tune is CE on the training data with Adam(lr, weight decay), only the Linear's weight and bias (the
preprint: lr 1e-4, 10 epochs, weight decay 1e-4). The backbone is frozen (features detached, as the released code)
and run in EVAL mode, so its features are computed ONCE and the epochs run over the cached features. This departs
from the released code, which calls `model.train()` for the fine-tune: there BatchNorm normalises with batch
statistics (and updates its running statistics) and dropout is active in the backbone. Eval mode keeps the pruned
features deterministic and the backbone's BatchNorm untouched, and makes caching exact; on nets without BatchNorm or
dropout (crayon-mlp, the small CNNs) the two are the same.

`random_channels` draws the Random Pruning baseline: as many channels as the "no" verdicts, uniformly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelfix.data.dataset import Dataset
from modelfix.errors import ModelfixError
from modelfix.explain.gradcam import default_cam_layer
from modelfix.repair.lastlayer import penultimate_features
from modelfix.repair.registry import method
from modelfix.training import TrainConfig, train
from modelfix.zoo import last_linear

PAPER = ('CRAYON preprint, "Towards Mitigating Spurious Correlations in Image Classifiers with Simple Yes-no '
         'Feedback", §3.3 (CRAYON-PRUNING)')
# Modules between the pruned layer and the last Linear that a default layer search walks back over.
_PASS_THROUGH = (nn.Flatten, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_HINT = "prune the module that feeds the last linear layer (the default) or name one with --layer"


@dataclass(frozen=True)
class HeadLink:
    """How the output of `layer` (`n_channels` channels) reaches the Linear `linear`: `kind` "flatten" (channel j
    owns the `positions` = H·W columns j·positions … (j+1)·positions−1) or "avgpool" (column j, positions = 1)."""

    layer: str
    linear: str
    kind: str
    n_channels: int
    positions: int

    def columns(self, channels: Sequence[int]) -> Tensor:
        """The input columns of the Linear that `channels` own (int64)."""
        return torch.tensor([j * self.positions + p for j in channels for p in range(self.positions)],
                            dtype=torch.long)


def _network(model: nn.Module) -> nn.Module:
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def _probe_input(model: nn.Module, x: Tensor | None) -> Tensor:
    """A few items to run: `x[:4]`, else seeded uniform noise in the model's input range (a `Classifier`)."""
    ref = next(iter(model.parameters()), torch.zeros(()))
    if x is not None:
        return x[:4].to(ref.device, ref.dtype)
    spec = getattr(model, "input_spec", None)
    if spec is None:
        raise ModelfixError("feature_layer needs example inputs (x) for a model without an input spec")
    low, high = spec.value_range
    noise = torch.rand(2, spec.channels, spec.height, spec.width, generator=torch.Generator().manual_seed(0))
    return (low + (high - low) * noise).to(ref.device, ref.dtype)


def _dry_run(model: nn.Module, x: Tensor, names: Sequence[str], linear: str) -> tuple[list, dict, list]:
    """One eval-mode forward pass of `x`: the ("start" | "end", module name) events in execution order, copies of
    the outputs of the modules in `names`, and copies of every input of the Linear `linear`. Copies, because a
    later in-place op (DenseNet's relu on norm5) would change them. Hooks removed, mode restored."""
    events: list[tuple[str, str]] = []
    outputs: dict[str, list] = {name: [] for name in names}
    inputs: list[Tensor] = []
    handles = []
    was_training = model.training
    try:
        for name, module in _network(model).named_modules():
            if not name:
                continue
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: events.append(("start", name))))
            handles.append(module.register_forward_hook(lambda m, args, out, name=name: events.append(("end", name))))
            if name in outputs:
                handles.append(module.register_forward_hook(lambda m, args, out, name=name: outputs[name].append(
                    out.detach().clone() if isinstance(out, Tensor) else out)))
            if name == linear:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args: inputs.append(args[0].detach().clone())))
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return events, outputs, inputs


def _default_layer(events: list, modules: dict, linear: str) -> str:
    """The last module to finish before the last Linear starts, walking back over flatten / pooling / dropout."""
    start = max(i for i, (kind, name) in enumerate(events) if kind == "start" and name == linear)
    for kind, name in reversed(events[:start]):
        if kind == "end" and not isinstance(modules[name], _PASS_THROUGH):
            return name
    raise ModelfixError(f"no module runs before the last linear layer '{linear}'", hint=_HINT)


def _link(layer: str, output: object, features: Tensor, linear: str) -> HeadLink:
    """The HeadLink when the Linear's input equals flatten(A), mean_hw(A) (or the same of ReLU(A)) on the probe."""
    fail = ModelfixError(f"layer '{layer}' is not followed by a linear layer (its output does not reach the last "
                         f"linear layer '{linear}' through flatten / average pooling only)", hint=_HINT)
    if not isinstance(output, Tensor) or output.dim() not in (2, 4) or output.shape[0] != features.shape[0]:
        raise fail
    scale = max(float(features.abs().max()), 1.0)
    for a in (output.to(features.dtype), torch.relu(output.to(features.dtype))):  # ReLU(0) = 0 keeps the fold exact
        candidates = []
        if a[0].numel() == features.shape[1]:
            candidates.append(("flatten", a.flatten(1), a[0, 0].numel()))
        if a.dim() == 4 and a.shape[1] == features.shape[1]:
            candidates.append(("avgpool", a.mean(dim=(2, 3)), 1))
        for kind, mapped, positions in candidates:
            if torch.allclose(features, mapped, rtol=1e-4, atol=1e-5 * scale):
                return HeadLink(layer, linear, kind, a.shape[1], positions)
    raise fail


def head_link(model: nn.Module, layer: str | None = None, x: Tensor | None = None) -> HeadLink:
    """Resolve the pruned layer and how it reaches the last Linear, from one dry run on `x[:4]` (or noise).

    `layer` None: `default_cam_layer` (ResNet layer4, DenseNet features.norm5) when it feeds the last Linear, else
    the module executed right before that Linear (skipping flatten / pooling / dropout modules).
    """
    net = _network(model)
    linear, _ = last_linear(net)
    modules = dict(net.named_modules())
    if layer is not None and (not layer or layer not in modules):
        raise ModelfixError(f"layer '{layer}' is not a module of the network",
                            hint="`modelfix inspect` lists the layer names")
    probe = _probe_input(model, x)
    if layer is None:  # a first pass finds the candidates: the conv block, else the module before the head
        events, _, _ = _dry_run(model, probe, [], linear)
        candidates = [name for name in (default_cam_layer(net), _default_layer(events, modules, linear)) if name]
    else:
        candidates = [layer]
    _, outputs, inputs = _dry_run(model, probe, candidates, linear)
    if len(inputs) != 1:
        raise ModelfixError(f"the last linear layer '{linear}' ran {len(inputs)} times in one forward pass; "
                            "CRAYON-PRUNING needs it to run once")
    error = None
    for name in dict.fromkeys(candidates):  # the conv block may feed more than the head (VGG, small nets): next one
        try:
            if len(outputs[name]) != 1:
                raise ModelfixError(f"layer '{name}' ran {len(outputs[name])} times in one forward pass; pruning "
                                    "needs a module that runs once", hint=_HINT)
            return _link(name, outputs[name][0], inputs[0].flatten(1), linear)
        except ModelfixError as e:
            error = e  # the last candidate's error is the one reported
    raise error


def feature_layer(model: nn.Module, layer: str | None = None, x: Tensor | None = None) -> str:
    """The name (inside `model.net`) of the layer whose output channels CRAYON-PRUNING prunes; raises ModelfixError
    "layer X is not followed by a linear layer" when masking its channels is not a column edit of the last Linear."""
    return head_link(model, layer, x).layer


def random_channels(n_channels: int, count: int, seed: int = 0) -> list[int]:
    """The Random Pruning baseline: `count` distinct channels of `n_channels`, uniformly, sorted."""
    if not 0 <= count <= n_channels:
        raise ModelfixError(f"cannot draw {count} random channels out of {n_channels}")
    order = torch.randperm(n_channels, generator=torch.Generator().manual_seed(seed))
    return sorted(int(j) for j in order[:count])


def _check_channels(prune: Sequence[int], n_channels: int, layer: str) -> list[int]:
    channels = []
    for j in prune:
        if isinstance(j, bool) or int(j) != j or not 0 <= int(j) < n_channels:
            raise ModelfixError(f"channel {j!r} is out of range for layer '{layer}' ({n_channels} channels: "
                                f"0..{n_channels - 1})", hint="check the layer and the neuron feedback file")
        channels.append(int(j))
    return sorted(set(channels))


def _head_stats(features: Tensor, y: Tensor, head: nn.Linear) -> tuple[float, float]:
    """(mean CE, accuracy) of `head` on cached features."""
    with torch.no_grad():
        logits = head(features)
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


class CachedFeatureHead(nn.Module):
    """The last Linear fed with cached features stored as N×F×1×1 dataset items (in the head's dtype)."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x.flatten(1).to(self.head.weight.dtype))


def prune_crayon(model: nn.Module, data, prune: Sequence[int], layer: str | None = None, epochs: int = 10,
                 lr: float = 1e-4, weight_decay: float = 1e-4, batch_size: int = 128, seed: int = 0,
                 progress: bool = True) -> tuple[nn.Module, dict]:
    """(pruned copy, trace): the `prune` channels of `layer` (see `head_link`) zeroed in the last Linear's input
    columns, then that Linear alone fine-tuned with CE on `data` (module docstring). `model` is left untouched.

    An empty `prune` returns an unchanged copy whose trace warns "no 'no' verdicts: nothing pruned".
    """
    if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 0:
        raise ModelfixError(f"--epochs must be a whole number >= 0, not {epochs}")
    if not (math.isfinite(lr) and lr > 0):
        raise ModelfixError(f"--lr must be a positive number, not {lr}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ModelfixError(f"--weight-decay must be >= 0, not {weight_decay}")
    if batch_size < 1:
        raise ModelfixError(f"--batch-size must be at least 1, not {batch_size}")
    if len(data) == 0:
        raise ModelfixError("the training data is empty")
    pruned = copy.deepcopy(model)
    link = head_link(pruned, layer, data.x)
    channels = _check_channels(prune, link.n_channels, link.layer)
    trace = {"method": "crayon-pruning", "paper": PAPER, "layer": link.layer, "linear": link.linear,
             "link": link.kind, "pruned": channels, "n_pruned": len(channels), "n_channels": link.n_channels,
             "epochs": int(epochs), "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed,
             "warnings": []}
    if not channels:
        trace["warnings"].append("no 'no' verdicts: nothing pruned")
        return pruned, trace

    head = _network(pruned).get_submodule(link.linear)
    weight = head.weight
    features = penultimate_features(pruned, data, progress=progress).to(weight.device, weight.dtype)
    y = data.y.to(weight.device)
    columns = link.columns(channels).to(weight.device)
    trace["loss_before"], trace["accuracy_before"] = _head_stats(features, y, head)
    with torch.no_grad():
        weight[:, columns] = 0
    trace["loss_pruned"], trace["accuracy_pruned"] = _head_stats(features, y, head)

    params = [p for p in head.parameters()]
    requires = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    # The pruned columns get a zero gradient, so Adam (whose L2 term is 0 on a zero weight) never moves them: they
    # stay exactly 0. The head trains in the one training loop on the cached features (N×F as N×F×1×1 items).
    handle = weight.register_hook(lambda grad: grad.index_fill(1, columns, 0))
    try:
        if epochs:
            cached = Dataset(x=features.detach().cpu().reshape(len(y), -1, 1, 1), y=y.cpu(), name="features")
            config = TrainConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, epochs=int(epochs),
                                 batch_size=batch_size, seed=seed)
            train(CachedFeatureHead(head), cached, config, progress=progress, description="crayon-pruning fc")
    finally:
        handle.remove()
        for p, flag in zip(params, requires):
            p.requires_grad_(flag)
            p.grad = None
    trace["final_loss"], trace["accuracy_after"] = _head_stats(features, y, head)
    return pruned, trace


@method("crayon-pruning", "pruning", "zero the channels people answered 'no', then refit only the last linear layer",
        PAPER, {"layer": None, "random": False, "epochs": 10, "lr": 1e-4, "weight_decay": 1e-4},
        needs=("data", "neuron_feedback"), command="prune-crayon")
def run_crayon_pruning(inputs, **options):
    """Neuron verdicts from `inputs.feedback` (the layer: `layer`, else the file's, else the default), then
    `prune_crayon` on `inputs.data`; `random` prunes as many random channels (the paper's baseline)."""
    from modelfix.feedback import declared_layer, read_neuron_feedback
    from modelfix.repair.result import RepairResult

    data = inputs.data
    link = head_link(inputs.model, options["layer"] or declared_layer(inputs.feedback), data.x[:4])
    verdicts = read_neuron_feedback(inputs.feedback, link.n_channels, link.layer)
    prune = random_channels(link.n_channels, len(verdicts.prune), inputs.seed) if options["random"] else verdicts.prune
    pruned, trace = prune_crayon(inputs.model, data, prune, layer=link.layer, epochs=options["epochs"],
                                 lr=options["lr"], weight_decay=options["weight_decay"], batch_size=inputs.batch_size,
                                 seed=inputs.seed, progress=inputs.progress)
    trace["method"] = "crayon-pruning" + (" (random baseline)" if options["random"] else "")
    trace["feedback"] = {"file": str(inputs.feedback), "no": len(verdicts.prune), "keep": len(verdicts.keep)}
    warnings = trace.pop("warnings", [])
    return RepairResult(pruned, "crayon-pruning", "pruning", {**options, "layer": link.layer}, trace,
                        warnings=warnings)
