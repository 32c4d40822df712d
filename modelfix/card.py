"""The model card: what a checkpoint needs to be rebuilt, preprocessed and traced back to its origin.

A card travels inside every safetensors file modelfix writes (as a JSON string in the flat str→str metadata) and
next to it as a readable `<stem>.card.json` sidecar.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from modelfix import safe_json
from modelfix.errors import CheckpointError, ModelfixError

SCHEMA = "modelfix.card/v1"
METADATA_KEY = "modelfix.card"
VERSION_KEY = "modelfix.version"


def modelfix_version() -> str:
    """The running modelfix version: the package's `__version__`, else the installed distribution's, else 'unknown'."""
    try:
        import modelfix

        version = getattr(modelfix, "__version__", None)
        if version:
            return str(version)
    except ImportError:  # pragma: no cover - we are inside the package
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version("modelfix")
    except (ImportError, PackageNotFoundError):
        return "unknown"


def torch_version() -> str:
    """The running torch version (recorded in history entries for reproducibility)."""
    import torch

    return str(torch.__version__)


def _invalid(name: str, why: str) -> CheckpointError:
    return CheckpointError(f"model card field '{name}' {why}")


def _require(d: Mapping, key: str, prefix: str = "") -> Any:
    if key not in d or d[key] is None:
        raise _invalid(prefix + key, "is missing")
    return d[key]


def _as_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _invalid(name, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _as_floats(value: Any, name: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise _invalid(name, f"must be a non-empty list of numbers, got {value!r}")
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise _invalid(name, f"must be a non-empty list of numbers, got {value!r}") from None


def _as_dict(value: Any, name: str) -> dict:
    if not isinstance(value, Mapping):
        raise _invalid(name, f"must be a JSON object, got {type(value).__name__}")
    return dict(value)


@dataclass
class InputSpec:
    """The pixel-space input a model expects: shape, normalisation (mean/std per channel or one for all) and range."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.value_range = tuple(float(v) for v in self.value_range)  # type: ignore[assignment]
        for name in ("channels", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelfixError(f"input {name} must be a positive integer, got {value!r}")
        for name in ("mean", "std"):
            n = len(getattr(self, name))
            if n not in (1, self.channels):
                raise ModelfixError(f"input {name} has {n} values; expected 1 or {self.channels} (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ModelfixError(f"input std must be positive, got {list(self.std)}")
        if len(self.value_range) != 2 or not self.value_range[0] < self.value_range[1]:
            raise ModelfixError(f"input value_range must be [low, high] with low < high, got {list(self.value_range)}")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return (self.height, self.width)

    def to_dict(self) -> dict:
        return {
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "mean": list(self.mean),
            "std": list(self.std),
            "value_range": list(self.value_range),
        }

    @classmethod
    def from_dict(cls, d: Mapping, prefix: str = "input.") -> InputSpec:
        """Parse and validate; a missing or bad field raises CheckpointError naming it (e.g. 'input.mean')."""
        d = _as_dict(d, prefix.rstrip(".") or "input")
        kwargs: dict[str, Any] = {
            name: _as_int(_require(d, name, prefix), prefix + name) for name in ("channels", "height", "width")
        }
        kwargs["mean"] = _as_floats(_require(d, "mean", prefix), prefix + "mean")
        kwargs["std"] = _as_floats(_require(d, "std", prefix), prefix + "std")
        if d.get("value_range") is not None:
            kwargs["value_range"] = _as_floats(d["value_range"], prefix + "value_range")
        try:
            return cls(**kwargs)
        except ModelfixError as e:
            raise CheckpointError(f"model card field '{prefix.rstrip('.')}' is invalid: {e.message}") from None


@dataclass
class ModelCard:
    """Everything needed to rebuild, preprocess and trace a checkpoint (see docs/architecture.md, "Model card")."""

    arch: str
    num_classes: int
    input: InputSpec
    class_names: list[str] = field(default_factory=list)
    arch_kwargs: dict = field(default_factory=dict)
    artifact: str | None = None
    dataset: dict | None = None
    provenance: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    patches: list[dict] = field(default_factory=list)
    modelfix_version: str = field(default_factory=modelfix_version)

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ModelfixError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]
        self.class_names = [str(c) for c in self.class_names]
        if len(self.class_names) != self.num_classes:
            raise ModelfixError(
                f"{len(self.class_names)} class names given for {self.num_classes} classes",
                hint="give one name per class",
            )

    def to_dict(self) -> dict:
        """A JSON-ready dict (a deep copy: mutating it leaves the card alone)."""
        return {
            "schema": SCHEMA,
            "arch": self.arch,
            "arch_kwargs": copy.deepcopy(self.arch_kwargs),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "input": self.input.to_dict(),
            "artifact": self.artifact,
            "dataset": copy.deepcopy(self.dataset),
            "provenance": copy.deepcopy(self.provenance),
            "history": copy.deepcopy(self.history),
            "patches": copy.deepcopy(self.patches),
            "modelfix_version": self.modelfix_version,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelCard:
        """Parse and validate a card dict; raises CheckpointError naming the first missing or invalid field."""
        if not isinstance(d, Mapping):
            raise CheckpointError(f"model card must be a JSON object, got {type(d).__name__}")
        schema = d.get("schema", SCHEMA)
        if schema != SCHEMA:
            raise CheckpointError(
                f"model card has schema {schema!r}; this modelfix reads {SCHEMA!r}",
                hint="upgrade modelfix, or the file was not written by modelfix",
            )
        arch = _require(d, "arch")
        if not isinstance(arch, str) or not arch:
            raise _invalid("arch", f"must be a non-empty string, got {arch!r}")
        num_classes = _as_int(_require(d, "num_classes"), "num_classes")
        spec = InputSpec.from_dict(_require(d, "input"))
        class_names = d.get("class_names") or []
        if not isinstance(class_names, list):
            raise _invalid("class_names", "must be a list of strings")
        if class_names and len(class_names) != num_classes:
            raise _invalid("class_names", f"has {len(class_names)} names for num_classes={num_classes}")
        artifact = d.get("artifact")
        if artifact is not None and not isinstance(artifact, str):
            raise _invalid("artifact", "must be a string or null")
        dataset = d.get("dataset")
        if dataset is not None:
            dataset = _as_dict(dataset, "dataset")
        lists = {}
        for name in ("history", "patches"):
            value = d.get(name) or []
            if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
                raise _invalid(name, "must be a list of JSON objects")
            lists[name] = [dict(v) for v in value]
        return cls(
            arch=arch,
            num_classes=num_classes,
            input=spec,
            class_names=[str(c) for c in class_names],
            arch_kwargs=_as_dict(d.get("arch_kwargs") or {}, "arch_kwargs"),
            artifact=artifact,
            dataset=copy.deepcopy(dataset),
            provenance=copy.deepcopy(_as_dict(d.get("provenance") or {}, "provenance")),
            history=copy.deepcopy(lists["history"]),
            patches=copy.deepcopy(lists["patches"]),
            modelfix_version=str(d.get("modelfix_version") or "unknown"),
        )

    def to_json(self, indent: int | None = None) -> str:
        """The card as JSON text (compact by default; `indent=2` for the sidecar)."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        data = safe_json.loads(text, "model card", error=CheckpointError)  # bounded: cards come from anywhere
        return cls.from_dict(data)

    def to_metadata(self) -> dict[str, str]:
        """Flat str→str safetensors metadata: `format: pt` (what HF loaders expect), the card, the version."""
        return {"format": "pt", METADATA_KEY: self.to_json(), VERSION_KEY: self.modelfix_version}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str] | None) -> ModelCard | None:
        """The card stored in safetensors metadata, or None when the file carries none."""
        if not meta or METADATA_KEY not in meta:
            return None
        return cls.from_json(meta[METADATA_KEY])

    def with_history(self, entry: Mapping) -> ModelCard:
        """A copy with `entry` appended to the history, stamped with library versions and a UTC timestamp."""
        card = copy.deepcopy(self)
        stamped = copy.deepcopy(dict(entry))
        stamped["versions"] = {
            **stamped.get("versions", {}),
            "modelfix": modelfix_version(),
            "torch": torch_version(),
        }
        stamped.setdefault("timestamp", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        card.history.append(stamped)
        card.modelfix_version = modelfix_version()
        return card

    def fingerprint(self) -> str:
        """sha256 of the card's canonical JSON: identifies a card (e.g. as the parent in a child's provenance)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
