"""Safe checkpoint loading (safetensors or torch state dicts; no unpickling unless trusted) and atomic saving."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pickle
import secrets
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from modelfix import safe_json
from modelfix.card import InputSpec, ModelCard
from modelfix.errors import ArchitectureMismatch, CheckpointError, ModelfixError
from modelfix.repair.patches import PATCH_PREFIX, apply_patches, patch_state
from modelfix.zoo import (
    Classifier,
    build_model,
    build_net,
    default_input_spec,
    first_conv,
    get_arch,
    is_factory,
    last_linear,
    list_architectures,
)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Keys under which training scripts commonly nest the state dict (timm's sniffing list, plus a few).
CONFIG_NAME = "config.json"  # timm save_for_hf / Hugging Face layout beside the weights
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "net")
STRIP_PREFIXES = ("module.", "_orig_mod.")
TRUST_HINT = (
    "re-save it with torch.save(model.state_dict(), ...) or pass --trust-checkpoint if you trust its source"
)


@dataclass
class ModelOverrides:
    """Command-line facts about a checkpoint; each one given replaces the card's field (or builds a missing card)."""

    arch: str | None = None
    num_classes: int | None = None
    in_channels: int | None = None
    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: list[str] | None = None


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where a checkpoint's readable card lives: `<stem>.card.json` next to it."""
    path = Path(path)
    return path.with_name(path.stem + ".card.json")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# reading


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"cannot read safetensors file {path}: {e}", hint="the file is corrupt or not a safetensors file"
        ) from None
    return tensors, metadata


def _unsafe_globals(path: Path) -> list[str]:
    getter = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if getter is None:
        return []
    try:
        return list(getter(str(path)))
    except Exception:  # an old (non-zip) format or a broken archive: we only wanted a nicer message
        return []


def _read_torch(path: Path, trust: bool) -> object:
    """torch.load with weights_only=True (plus argparse.Namespace, as timm allows); full unpickling only if trusted."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust:
            found = _unsafe_globals(path)
            shown = ", ".join(found[:5]) + (f", … (+{len(found) - 5} more)" if len(found) > 5 else "")
            raise CheckpointError(
                f"checkpoint {path} is a pickled object (globals: {shown or 'unknown'}), not a state dict; "
                "refusing to unpickle it",
                hint=TRUST_HINT,
            ) from None
    except RuntimeError as e:
        if "TorchScript" in str(e):
            raise CheckpointError(
                f"checkpoint {path} is a TorchScript archive, not a state dict",
                hint="save model.state_dict() and pass --arch",
            ) from None
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # zip/EOF/key errors from a truncated or foreign file
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {e}", hint="the file is corrupt or not a checkpoint"
        ) from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot unpickle checkpoint {path}: {type(e).__name__}: {e}") from None


def _find_state_dict(obj: object, depth: int = 0) -> Mapping | None:
    """The mapping that holds the tensors: the object itself, a module's state_dict, or one under a wrapper key."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        return None
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if depth < 3:
        for key in WRAPPER_KEYS:
            if key in obj:
                found = _find_state_dict(obj[key], depth + 1)
                if found is not None:
                    return found
    return None


def _strip(key: str, prefixes: Iterable[str]) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _clean_state_dict(raw: Mapping) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Tensors only, `module.`/`_orig_mod.` (and a common `net.`) prefixes removed; patch tensors split off."""
    state: dict[str, torch.Tensor] = {}
    patches: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        key = _strip(key, STRIP_PREFIXES)
        (patches if key.startswith(PATCH_PREFIX) else state)[key] = value
    if state and all(k.startswith("net.") for k in state):  # a Classifier.state_dict()
        state = {_strip(k[len("net.") :], STRIP_PREFIXES): v for k, v in state.items()}
    return state, patches


def _read_card(path: Path, metadata: Mapping[str, str]) -> ModelCard | None:
    """The card in the file's metadata, else in the sidecar, else None; a broken card names where it came from."""
    try:
        card = ModelCard.from_metadata(metadata)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path}: {e.message}", hint=e.hint) from None
    if card is not None:
        return card
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        return ModelCard.from_json(side.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read model card {side}: {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"model card {side}: {e.message}", hint=e.hint or "fix or delete the sidecar") from None


# ---------------------------------------------------------------------------------------------------------------
# config.json (timm's save_for_hf layout: model.safetensors + config.json)


def config_overrides(config_path: Path) -> ModelOverrides | None:
    """What a timm/HF-style `config.json` says: `architecture`, `num_classes`, `label_names`, and the input
    (`input_size` [C, H, W], `mean`, `std`) at the top level or under `pretrained_cfg`. None when the file is
    absent or names none of these (another tool's config). A timm name becomes `timm:<name>` when timm is
    installed and knows it, else it is read as a modelfix or torchvision name."""
    if not config_path.is_file():
        return None
    try:
        raw = config_path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {config_path}: {e}") from None
    cfg = safe_json.loads(raw, str(config_path), error=CheckpointError)
    if not isinstance(cfg, dict):
        return None
    pre = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else {}
    merged = {**pre, **{k: v for k, v in cfg.items() if k != "pretrained_cfg"}}
    known = ("architecture", "num_classes", "label_names", "input_size", "mean", "std")
    if not any(k in merged for k in known):
        return None

    def bad(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{config_path}: '{key}' {why}")

    o = ModelOverrides()
    arch = merged.get("architecture")
    if arch is not None:
        if not isinstance(arch, str) or not arch:
            raise bad("architecture", "must be a name")
        o.arch = f"timm:{arch}" if ":" not in arch and timm_knows(arch) else arch
    names = merged.get("label_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            raise bad("label_names", "must be a list of names")
        o.class_names = [str(n) for n in names]
    k = merged.get("num_classes")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise bad("num_classes", "must be a positive integer")
        o.num_classes = k
    size = merged.get("input_size")
    if size is not None:
        if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
            raise bad("input_size", "must be [channels, height, width]")
        o.in_channels, o.input_size = size[0], (size[1], size[2])
    for key in ("mean", "std"):
        value = merged.get(key)
        if value is not None:
            if not (isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value)):
                raise bad(key, "must be a list of numbers")
            setattr(o, key, tuple(float(v) for v in value))
    return o


def timm_knows(name: str) -> bool:
    """True when timm is installed and has an architecture `name`."""
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name))


def _with_config(o: ModelOverrides, config_path: Path) -> ModelOverrides:
    """The user's overrides, with the config's values where the user gave none."""
    cfg = config_overrides(config_path)
    if cfg is None:
        return o
    return ModelOverrides(**{f.name: getattr(o, f.name) if getattr(o, f.name) is not None else getattr(cfg, f.name)
                             for f in dataclasses.fields(ModelOverrides)})


# ---------------------------------------------------------------------------------------------------------------
# card resolution


def _fit_stats(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """Per-channel stats for a new channel count: kept when they fit, else averaged into one value for all channels."""
    if len(values) in (1, channels):
        return tuple(values)
    return (sum(values) / len(values),)


def _probe_net(arch: str, in_channels: int, input_size: tuple[int, int], arch_kwargs: dict) -> nn.Module:
    """A weightless (meta-device) instance of `arch`, only to learn its layer names."""
    with torch.device("meta"):
        return build_net(arch, 2, in_channels, input_size, **arch_kwargs)


def _resolve_card(
    path: Path, card: ModelCard | None, o: ModelOverrides, state: Mapping[str, torch.Tensor], trust: bool = False
) -> ModelCard:
    """Apply explicit overrides to the card; without a card, build one from --arch, inferring what is not given.

    Inference (card-less files only): num_classes from the out-dimension of the last Linear's weight, in_channels
    from the first Conv2d's weight; input size, mean and std from the architecture's default input spec.
    """
    if card is None and o.arch is None:
        raise CheckpointError(
            f"checkpoint {path} has no model card; pass --arch (one of {', '.join(list_architectures())})"
        )
    arch = o.arch or card.arch  # type: ignore[union-attr]
    if o.arch is None and is_factory(arch) and not trust:
        raise CheckpointError(
            f"checkpoint {path}'s card names the Python factory '{arch}'; importing it runs code",
            hint=f"pass --arch {arch} (or --trust-checkpoint) if you trust it")
    get_arch(arch)  # unknown name -> ModelfixError listing the known ones
    same_arch = card is not None and arch == card.arch
    arch_kwargs = dict(card.arch_kwargs) if same_arch else {}
    spec = card.input if card is not None else default_input_spec(arch)
    size = tuple(o.input_size) if o.input_size is not None else (spec.height, spec.width)

    channels, num_classes = o.in_channels, o.num_classes
    if card is None and (channels is None or num_classes is None):
        probe = _probe_net(arch, spec.channels, size, arch_kwargs)
        if channels is None:
            conv = first_conv(probe)
            weight = state.get(f"{conv[0]}.weight") if conv else None
            if weight is not None and weight.dim() == 4:
                channels = int(weight.shape[1]) * conv[1].groups
        if num_classes is None:
            name, _ = last_linear(probe)
            weight = state.get(f"{name}.weight")
            if weight is None or weight.dim() != 2:
                raise CheckpointError(
                    f"checkpoint {path} does not look like arch '{arch}': it has no '{name}.weight' "
                    f"(its first keys: {', '.join(list(state)[:4])})",
                    hint="check --arch, or pass --num-classes",
                )
            num_classes = int(weight.shape[0])
    channels = channels or spec.channels
    num_classes = num_classes or card.num_classes  # type: ignore[union-attr]

    mean = tuple(o.mean) if o.mean is not None else _fit_stats(spec.mean, channels)
    std = tuple(o.std) if o.std is not None else _fit_stats(spec.std, channels)
    new_spec = InputSpec(channels, int(size[0]), int(size[1]), mean, std, spec.value_range)

    if o.class_names is not None:
        class_names = list(o.class_names)
    elif card is not None and card.num_classes == num_classes:
        class_names = list(card.class_names)
    else:
        class_names = []
    if card is None:
        return ModelCard(arch=arch, num_classes=num_classes, input=new_spec, class_names=class_names)
    return dataclasses.replace(
        card, arch=arch, arch_kwargs=arch_kwargs, num_classes=num_classes, input=new_spec, class_names=class_names
    )


# ---------------------------------------------------------------------------------------------------------------
# matching the state dict


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_fit(path: Path, card: ModelCard, net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise ArchitectureMismatch naming missing/unexpected keys and the first shape mismatch, with a hint."""
    expected = net.state_dict()
    for key in [k for k in expected if k not in state and k.endswith("num_batches_tracked")]:
        state[key] = expected[key].clone()  # older torch versions did not save this counter
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and _shape(state[k]) != _shape(expected[k])]
    if not (missing or unexpected or shapes):
        return

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    hint = f"check --arch (one of {', '.join(list_architectures())})"
    if shapes:
        key = shapes[0]
        got, want = _shape(state[key]), _shape(expected[key])
        parts.append(f"{key} has shape {got} in the file but {want} in the model")
        head = last_linear(net)[0]
        conv = first_conv(net)
        if key in (f"{head}.weight", f"{head}.bias") and got[1:] == want[1:]:
            hint = f"pass --num-classes {got[0]}"
        elif conv and key == f"{conv[0]}.weight" and len(got) == 4 and got[0] == want[0]:
            hint = f"pass --in-channels {got[1]}"
        elif len(got) == 2 and len(want) == 2 and got[0] == want[0]:
            hint = "the input size differs from the one the file was trained at; pass --input-size"
    raise ArchitectureMismatch(
        f"checkpoint {path} does not fit arch '{card.arch}' (num_classes={card.num_classes}, "
        f"in_channels={card.input.channels}, input {card.input.height}x{card.input.width}): " + "; ".join(parts),
        hint=hint,
    )


def load_model(
    path: str | os.PathLike,
    overrides: ModelOverrides | None = None,
    trust: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[Classifier, ModelCard]:
    """Load a checkpoint into a `Classifier` in eval mode on `device`, with the card that describes it."""
    path = Path(path)
    overrides = overrides or ModelOverrides()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint {path} is not readable")

    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        raw, metadata = _read_safetensors(path)
    else:
        obj = _read_torch(path, trust)
        raw = _find_state_dict(obj)
        if raw is None:
            raise CheckpointError(
                f"checkpoint {path} holds no tensors (a {type(obj).__name__}"
                + (f" with keys {', '.join(map(str, list(obj)[:6]))}" if isinstance(obj, Mapping) else "")
                + ")",
                hint=f"expected a state dict, possibly under one of {', '.join(WRAPPER_KEYS)}",
            )
    state, patch_tensors = _clean_state_dict(raw)

    card = _read_card(path, metadata)
    if card is None:  # a timm/HF config.json beside the weights fills what the user did not say
        overrides = _with_config(overrides, path.parent / CONFIG_NAME)
    card = _resolve_card(path, card, overrides, state, trust)
    model = build_model(card)
    _check_fit(path, card, model.net, state)
    try:
        model.net.load_state_dict(state, strict=True)
    except RuntimeError as e:  # _check_fit should have caught it; keep the one-line contract anyway
        raise ArchitectureMismatch(f"checkpoint {path} does not fit arch '{card.arch}': {e}") from None
    if patch_tensors and not card.patches:
        raise CheckpointError(
            f"checkpoint {path} has patch tensors ({', '.join(list(patch_tensors)[:3])}) but its card lists no patches"
        )
    if card.patches:
        apply_patches(model, card.patches, patch_tensors)
    model.eval()
    return model.to(device), card


# ---------------------------------------------------------------------------------------------------------------
# writing


def write_checkpoint(model: nn.Module, card: ModelCard, path: Path, sidecar: Path) -> None:
    """Write `model`'s tensors (stock `net` keys plus patch tensors) with `card` in the metadata to `path`, and the
    card as JSON to `sidecar`, exactly where named (the callers write temporary names and rename them)."""
    from safetensors.torch import save_file

    net = model.net if isinstance(model, Classifier) else model
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    extra, entries = patch_state(model)
    tensors.update({k: v.detach().to("cpu").contiguous().clone() for k, v in extra.items()})
    card = dataclasses.replace(card, patches=list(entries))
    save_file(tensors, str(path), metadata=card.to_metadata())
    Path(sidecar).write_text(card.to_json(indent=2) + "\n", encoding="utf-8")


def save_model(
    model: nn.Module, card: ModelCard, path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """Write `model` as safetensors (card in the metadata) plus the `<stem>.card.json` sidecar, atomically.

    The tensors are `net.state_dict()` (stock keys) plus the patch tensors; the card written lists exactly the
    patches `patch_state(model)` reports. Both files go to temporary names in the target folder and are renamed
    into place; on any failure nothing is left behind. An output that is one of `inputs` is refused.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelfixError(f"output {path} must end in .safetensors", hint="modelfix writes safetensors only")
    side = sidecar_path(path)
    targets = {path.resolve(), side.resolve()}
    for source in inputs:
        if {Path(source).resolve(), sidecar_path(source).resolve()} & targets:  # the input or its card
            raise ModelfixError(f"refusing to write {path} over the input {source} (or its card)",
                                hint="choose another output path")

    token = secrets.token_hex(4)
    tmp = path.with_name(f".{path.name}.{token}.tmp")
    tmp_side = side.with_name(f".{side.name}.{token}.tmp")
    placed: list[Path] = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint(model, card, tmp, tmp_side)
        os.replace(tmp, path)
        placed.append(path)
        os.replace(tmp_side, side)
    except BaseException as e:
        for leftover in (tmp, tmp_side, *placed):
            leftover.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ModelfixError(f"cannot write {path}: {e}") from None
        raise
    return path
