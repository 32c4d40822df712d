"""Architecture registry (torchvision names and the papers' small nets) and the normalising `Classifier` wrapper."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from modelfix.card import InputSpec, ModelCard
from modelfix.errors import ModelfixError, UnsupportedModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Classifier(nn.Module):
    """`net` behind its input normalisation: `forward(x) = net((x - mean) / std)` with x in pixel space.

    `mean`/`std` are non-persistent buffers shaped (1, C, 1, 1), so `state_dict()` holds only `net.` keys.
    """

    def __init__(self, net: nn.Module, input_spec: InputSpec):
        super().__init__()
        self.net = net
        self.input_spec = input_spec
        c = input_spec.channels
        mean = torch.tensor(input_spec.mean, dtype=torch.float32).expand(c).reshape(1, c, 1, 1).clone()
        std = torch.tensor(input_spec.std, dtype=torch.float32).expand(c).reshape(1, c, 1, 1).clone()
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@dataclass(frozen=True)
class ArchInfo:
    """One registered architecture: how to build it, what it is, where it comes from, what input it expects."""

    builder: Callable[..., nn.Module]  # builder(num_classes, in_channels, input_size, **kwargs) -> nn.Module
    description: str
    source: str
    input_spec: InputSpec


# ---------------------------------------------------------------------------------------------------------------
# torchvision


def _replace_first_conv(net: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d for one with `in_channels` inputs and otherwise identical hyper-parameters."""
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            if module.groups != 1:
                raise UnsupportedModel(f"cannot change the input channels of grouped conv '{name}'")
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                kernel_size=module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, child, new)
            return
    raise UnsupportedModel("network has no Conv2d whose input channels could be changed")


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, input_size: tuple[int, int], **kwargs) -> nn.Module:
        import torchvision

        net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kwargs)
        if in_channels != 3:
            _replace_first_conv(net, in_channels)
        return net

    build.__doc__ = f"torchvision.models.{name}(weights=None) (never downloads), first conv adapted to in_channels."
    return build


# ---------------------------------------------------------------------------------------------------------------
# the papers' small nets: flat nn.Sequential with named layers and one ReLU instance per use


def _flat_features(layers: list[tuple[str, nn.Module]], in_channels: int, input_size: tuple[int, int]) -> int:
    """Number of features after `layers` for one (C, H, W) input, found by a dry run so any input size works."""
    probe = nn.Sequential(OrderedDict(layers))
    try:
        with torch.no_grad():
            out = probe(torch.zeros(1, in_channels, *input_size))
    except RuntimeError as e:
        raise ModelfixError(f"input size {input_size[0]}x{input_size[1]} is too small for this network ({e})") from None
    return out[0].numel()


def build_mlp(num_classes: int, in_channels: int, input_size: tuple[int, int], hidden: int = 512) -> nn.Module:
    """R4's fully connected net (784-512-10 on MNIST): Flatten, Linear(C*H*W, hidden), ReLU, Linear(hidden, K)."""
    d = in_channels * input_size[0] * input_size[1]
    return nn.Sequential(
        OrderedDict(
            [
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(d, hidden)),
                ("relu1", nn.ReLU()),
                ("fc2", nn.Linear(hidden, num_classes)),
            ]
        )
    )


def build_tap_cnn(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """The TAP paper's MNIST CNN: two 100@3x3 convs with max-pooling, one linear layer (3600 features at 28x28)."""
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(in_channels, 100, 3, padding=1)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(100, 100, 3)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
    ]
    layers.append(("fc", nn.Linear(_flat_features(layers, in_channels, input_size), num_classes)))
    return nn.Sequential(OrderedDict(layers))


def build_egem_cnn(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """EGEM paper Table 1: conv 8@3x3, pool 2, conv 16@5x5, pool 2, fc 200, fc K; no padding (256 features at 28x28)."""
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(in_channels, 8, 3)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(8, 16, 5)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
    ]
    features = _flat_features(layers, in_channels, input_size)
    layers += [
        ("fc1", nn.Linear(features, 200)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(200, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


def build_egem_cnn_ref(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """The EGEM reference code's `mnistnet` blueprint: conv 8@3x3 pad 1, pool 2, conv 16@3x3 pad 1, pool 2, fc 500,
    fc K (784 features at 28x28). It differs from the paper's Table 1 (`egem-cnn`); on the modified MNIST it learns
    the 3-pixel shortcut much more reliably (docs/benchmarks.md)."""
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(in_channels, 8, 3, padding=1)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(8, 16, 3, padding=1)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
    ]
    features = _flat_features(layers, in_channels, input_size)
    layers += [
        ("fc1", nn.Linear(features, 500)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(500, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


def build_derma_cnn(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """R4's DermaNet "medium_large" CNN (14400 features at 64x64).

    R4 ends in a single sigmoid unit for its binary task; here the last layer has K logits trained with softmax
    cross-entropy, like every other modelfix classifier.
    """
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(in_channels, 32, 3, 1, 1)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(32, 32, 4, 2, 1)),
        ("relu2", nn.ReLU()),
        ("conv3", nn.Conv2d(32, 64, 4, 1, 1)),
        ("relu3", nn.ReLU()),
        ("conv4", nn.Conv2d(64, 64, 4, 2, 1)),
        ("relu4", nn.ReLU()),
        ("flatten", nn.Flatten()),
    ]
    features = _flat_features(layers, in_channels, input_size)
    layers += [
        ("fc1", nn.Linear(features, 1024)),
        ("relu5", nn.ReLU()),
        ("fc2", nn.Linear(1024, 1024)),
        ("relu6", nn.ReLU()),
        ("fc3", nn.Linear(1024, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


def build_crayon_mlp(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """CRAYON's small fully connected net: Flatten, Linear(D, 50), ReLU, Linear(50, 30), ReLU, Linear(30, K)."""
    d = in_channels * input_size[0] * input_size[1]
    return nn.Sequential(
        OrderedDict(
            [
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(d, 50)),
                ("relu1", nn.ReLU()),
                ("fc2", nn.Linear(50, 30)),
                ("relu2", nn.ReLU()),
                ("fc3", nn.Linear(30, num_classes)),
            ]
        )
    )


# ---------------------------------------------------------------------------------------------------------------
# registry

_IMAGENET = InputSpec(3, 224, 224, IMAGENET_MEAN, IMAGENET_STD)
_MNIST_RAW = InputSpec(1, 28, 28, (0.0,), (1.0,))

ARCHITECTURES: dict[str, ArchInfo] = {
    **{
        name: ArchInfo(_torchvision(name), description, source, _IMAGENET)
        for name, description, source in [
            ("resnet18", "ResNet-18 (torchvision)", "He et al. 2016, Deep Residual Learning; torchvision"),
            ("resnet34", "ResNet-34 (torchvision)", "He et al. 2016, Deep Residual Learning; torchvision"),
            ("resnet50", "ResNet-50 (torchvision)", "He et al. 2016, Deep Residual Learning; torchvision"),
            ("vgg11", "VGG-11 (torchvision)", "Simonyan & Zisserman 2015; torchvision"),
            ("vgg11_bn", "VGG-11 with batch norm (torchvision)", "Simonyan & Zisserman 2015; torchvision"),
            ("vgg16", "VGG-16 (torchvision)", "Simonyan & Zisserman 2015; torchvision"),
            ("vgg16_bn", "VGG-16 with batch norm (torchvision)", "Simonyan & Zisserman 2015; torchvision"),
            ("densenet121", "DenseNet-121 (torchvision)", "Huang et al. 2017, Densely Connected CNNs; torchvision"),
        ]
    },
    "mlp": ArchInfo(
        build_mlp, "fully connected net 784-512-10 (kwarg hidden)", "R4 (Rand-/Adv-/Cert-R4) MNIST FCN", _MNIST_RAW
    ),
    "tap-cnn": ArchInfo(
        build_tap_cnn,
        "2x conv 100@3x3 + max-pool, linear head",
        "TAP (targeted activation penalty) MNIST CNN",
        InputSpec(1, 28, 28, (0.1307,), (0.3081,)),
    ),
    "egem-cnn": ArchInfo(
        build_egem_cnn, "conv 8@3x3, conv 16@5x5, fc 200, fc K", "EGEM paper, Table 1 (MNIST)", _MNIST_RAW
    ),
    "egem-cnn-ref": ArchInfo(
        build_egem_cnn_ref, "conv 8@3x3 pad 1, conv 16@3x3 pad 1, fc 500, fc K",
        "EGEM reference code `mnistnet` blueprint (MNIST)", _MNIST_RAW
    ),
    "derma-cnn": ArchInfo(
        build_derma_cnn,
        "4 convs (32,32,64,64), fc 1024, fc 1024, fc K",
        "R4 DermaNet medium_large (ISIC)",
        InputSpec(3, 64, 64, (0.0,), (1.0,)),
    ),
    "crayon-mlp": ArchInfo(build_crayon_mlp, "fully connected net D-50-30-K", "CRAYON small MLP", _MNIST_RAW),
}


MAX_PARAMS = 1_000_000_000  # 4 GB of float32 weights (ViT-g size): larger nets are refused before allocation
MAX_INPUT_PIXELS = 2**26  # 8192×8192: a larger input size is refused before a dry run allocates it
TIMM_PREFIX = "timm:"


def list_architectures() -> list[str]:
    """Registered architecture names, in registry order (any torchvision classification model, a timm model
    and a `package.module:factory` are accepted too; see `get_arch`)."""
    return list(ARCHITECTURES)


@functools.lru_cache(maxsize=1)
def torchvision_models() -> tuple[str, ...]:
    """Every torchvision classification model name (`torchvision.models.list_models(module=torchvision.models)`)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _torchvision_spec(name: str) -> InputSpec:
    """The input torchvision's default weights were trained on (crop size, mean, std), read from the weights'
    transform preset (no download); ImageNet 224 when the model has no weights."""
    import torchvision

    try:
        preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        size = int(preset.crop_size[0])
        return InputSpec(3, size, size, tuple(preset.mean), tuple(preset.std))
    except (AttributeError, KeyError, ValueError, IndexError, TypeError):
        return _IMAGENET


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


def _timm_info(name: str) -> ArchInfo:
    timm = _timm()
    if timm is None:
        raise ModelfixError(f"architecture '{name}' needs timm, which is not installed",
                            hint="pip install 'modelfix[timm]'")
    if not timm.is_model(name):
        raise ModelfixError(f"unknown timm architecture '{name}'", hint="see timm.list_models()")

    def build(num_classes: int, in_channels: int, input_size: tuple[int, int], **kwargs) -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)

    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    spec = _IMAGENET
    if cfg is not None and cfg.input_size:
        c, h, w = cfg.input_size
        spec = InputSpec(int(c), int(h), int(w), tuple(cfg.mean), tuple(cfg.std))
    return ArchInfo(build, f"{name} (timm, pretrained=False)", "timm", spec)


def _factory_info(path: str) -> ArchInfo:
    """`package.module:factory`: the user's own callable returning an nn.Module."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ModelfixError(f"architecture '{path}' is not package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        raise ModelfixError(f"cannot import module '{module_name}' of architecture '{path}': "
                            f"{type(e).__name__}: {e}", hint="check PYTHONPATH and the module name") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelfixError(f"module '{module_name}' has no callable '{attr}' (architecture '{path}')")
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepted = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())

    def build(num_classes: int, in_channels: int, input_size: tuple[int, int], **kwargs) -> nn.Module:
        # num_classes always; in_channels and input_size only when the factory takes them
        extra = {k: v for k, v in (("in_channels", in_channels), ("input_size", input_size))
                 if takes_all or k in accepted}
        net = factory(num_classes=num_classes, **extra, **kwargs)
        if not isinstance(net, nn.Module):
            raise ModelfixError(f"factory '{path}' returned a {type(net).__name__}, not an nn.Module")
        return net

    return ArchInfo(build, f"{path} (user factory)", path, _IMAGENET)


def is_factory(arch: str) -> bool:
    """True for a `package.module:factory` architecture (importing it runs the user's code)."""
    return ":" in arch and not arch.startswith(TIMM_PREFIX)


def get_arch(arch: str) -> ArchInfo:
    """The entry for `arch`: a registered name, any torchvision classification model, `timm:<name>` (or a bare
    timm name when timm is installed), or `package.module:factory`; anything else is one ModelfixError."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if not isinstance(arch, str) or not arch:
        raise ModelfixError(f"architecture must be a name, got {arch!r}")
    if arch.startswith(TIMM_PREFIX):
        return _timm_info(arch[len(TIMM_PREFIX):])
    if is_factory(arch):
        return _factory_info(arch)
    if arch in torchvision_models():
        return ArchInfo(_torchvision(arch), f"{arch} (torchvision)", "torchvision", _torchvision_spec(arch))
    timm = _timm()
    if timm is not None and timm.is_model(arch):
        return _timm_info(arch)
    raise ModelfixError(
        f"unknown architecture '{arch}'",
        hint=f"use one of: {', '.join(ARCHITECTURES)}, any torchvision model (modelfix archs), "
             "timm:<name> with timm installed, or package.module:factory",
    ) from None


def default_input_spec(arch: str) -> InputSpec:
    """The input spec `arch` expects by default (a fresh copy)."""
    spec = get_arch(arch).input_spec
    return InputSpec(spec.channels, spec.height, spec.width, spec.mean, spec.std, spec.value_range)


def count_parameters(arch: str, num_classes: int, in_channels: int, input_size: tuple[int, int],
                     **kwargs) -> int | None:
    """Parameters plus buffers of `arch` built on the meta device (shapes only, no memory); None when the
    builder cannot run there (it computes values at init)."""
    info = get_arch(arch)
    try:
        with torch.device("meta"):
            net = info.builder(num_classes, in_channels, tuple(input_size), **kwargs)
    except TypeError as e:
        raise ModelfixError(f"bad arch_kwargs {kwargs} for '{arch}': {e}") from None
    except ModelfixError:
        raise
    except (RuntimeError, NotImplementedError, ValueError):  # e.g. `.item()` on a meta tensor at init
        return None
    tensors = [*net.parameters(), *net.buffers()]
    return sum(t.numel() for t in tensors if not nn.parameter.is_lazy(t))  # lazy ones have no size yet


def check_size(arch: str, num_classes: int, in_channels: int, input_size: tuple[int, int],
               max_params: int = MAX_PARAMS, **kwargs) -> None:
    """Refuse, before anything is allocated, an input above MAX_INPUT_PIXELS or a net above `max_params`."""
    h, w = (int(v) for v in input_size)
    if h * w > MAX_INPUT_PIXELS or in_channels > 4096 or num_classes > 10**7:
        raise ModelfixError(f"'{arch}' with input {in_channels}×{h}×{w} and {num_classes} classes is too large "
                            f"(input at most {MAX_INPUT_PIXELS:,} pixels, 4096 channels, 10^7 classes)",
                            hint="check the card's input and num_classes, or --input-size")
    n = count_parameters(arch, num_classes, in_channels, (h, w), **kwargs)
    if n is not None and n > max_params:
        raise ModelfixError(f"'{arch}' with {kwargs or 'default arguments'} has {n:,} parameters, above the limit "
                            f"of {max_params:,} ({n * 4 / 2**30:.1f} GiB as float32)",
                            hint="check the card's arch_kwargs and input size")


def build_net(
    arch: str, num_classes: int, in_channels: int, input_size: tuple[int, int], **kwargs
) -> nn.Module:
    """A freshly initialised network (never downloads weights), its size checked on the meta device first."""
    info = get_arch(arch)
    check_size(arch, num_classes, in_channels, input_size, **kwargs)
    try:
        return info.builder(num_classes, in_channels, tuple(input_size), **kwargs)
    except TypeError as e:
        raise ModelfixError(f"bad arch_kwargs {kwargs} for '{arch}': {e}") from None


def build_model(card: ModelCard) -> Classifier:
    """The `Classifier` a card describes (random weights; checkpoint.load_model fills them in)."""
    spec = card.input
    net = build_net(card.arch, card.num_classes, spec.channels, (spec.height, spec.width), **card.arch_kwargs)
    return Classifier(net, spec)


def last_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    """The final nn.Linear in module order (the classifier head that refits and CRAYON replace)."""
    found = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise UnsupportedModel(f"{type(net).__name__} has no nn.Linear layer (needed for a last-layer method)")
    return found


def first_conv(net: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first nn.Conv2d in module order, or None for conv-free nets."""
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    return None
