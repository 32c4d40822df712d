"""The method registry: every repair method registers itself beside its definition, with what it needs and how it
runs (zennit's `register_composite`, timm's `register_model`).

A method file calls `register(Method(...))` (or decorates its run function with `method(...)`, or its objective
class with `objective(...)`). `get_method` and `list_methods` first import every module of the `modelfix.repair`
package, so adding a method is adding one file (plus its docs page): nothing else lists methods.

Kinds: `posthoc` (no training: EGEM, PCA-EGEM, egem-full, RGEM, Ridge), `pruning` (CRAYON-PRUNING: prune, then refit
the head) and `finetune` (a training objective for the one training loop, run through the λ sweep). A method's
`run(inputs, **options) -> RepairResult` repairs a copy; fine-tunes share one runner, registered by the sweep
module with `register_runner("finetune", ...)`.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

from modelfix.errors import ModelfixError

KINDS = ("posthoc", "pruning", "finetune")
# The inputs a method can need, each with the option that provides it (for the one error a missing input gives).
INPUTS = {
    "clean": "a pool of approved clean samples (--clean-dir DIR or --scenario NAME)",
    "data": "training data (--data)",
    "masks": "masks of the spurious regions (--masks DIR, a bundle with masks, or `modelfix annotate`)",
    "neuron_feedback": "neuron verdicts (--feedback neurons.csv; `modelfix feedback gallery` writes a blank one)",
    "sample_feedback": "sample verdicts (--feedback samples.csv; `modelfix feedback saliency` writes a blank one)",
}


@dataclass(frozen=True)
class Method:
    """One registry entry. `hyperparameters` maps each option the method takes to its default; `needs` names the
    inputs it cannot run without (keys of INPUTS); `weight` is the hyper-parameter `--lambda` sets; `command` is the
    CLI command that runs it on its own."""

    name: str
    kind: str
    summary: str
    paper: str
    hyperparameters: dict
    needs_masks: bool = False
    weight: str | None = None
    train_defaults: dict = field(default_factory=dict)  # TrainConfig overrides (fine-tunes)
    build: Callable[..., object] | None = None  # finetune: build(model, loss="ce", **hyperparameters) -> objective
    run: Callable[..., object] | None = None  # run(inputs, **options) -> RepairResult; None: the kind's runner
    needs: tuple[str, ...] = ()
    command: str = "finetune"

    def __post_init__(self) -> None:
        needs = tuple(self.needs) or (("data", "masks") if self.needs_masks else ("data",) if self.kind == "finetune"
                                      else ())
        object.__setattr__(self, "needs", needs)
        object.__setattr__(self, "needs_masks", "masks" in needs)

    def runner(self) -> Callable[..., object]:
        """`run(inputs, **options) -> RepairResult`: the method's own, else its kind's shared runner."""
        if self.run is not None:
            return self.run
        discover()
        if self.kind not in RUNNERS:
            raise ModelfixError(f"method '{self.name}' has no run function and kind '{self.kind}' no runner")
        return functools.partial(RUNNERS[self.kind], self)


METHODS: dict[str, Method] = {}
RUNNERS: dict[str, Callable[..., object]] = {}
_discovered = False


def register(entry: Method) -> Method:
    """Add `entry` to METHODS (a name can be registered once) and return it."""
    if entry.kind not in KINDS:
        raise ModelfixError(f"method kind must be one of {', '.join(KINDS)}, not '{entry.kind}'")
    if entry.kind == "finetune" and entry.build is None:
        raise ModelfixError(f"finetune method '{entry.name}' needs a build function")
    if entry.kind != "finetune" and entry.run is None:
        raise ModelfixError(f"{entry.kind} method '{entry.name}' needs a run function")
    unknown = [need for need in entry.needs if need not in INPUTS]
    if unknown:
        raise ModelfixError(f"method '{entry.name}' needs an unknown input '{unknown[0]}' (one of {', '.join(INPUTS)})")
    if entry.name in METHODS:
        raise ModelfixError(f"method '{entry.name}' is already registered")
    METHODS[entry.name] = entry
    return entry


def method(name: str, kind: str, summary: str, paper: str, hyperparameters: dict, **extra) -> Callable:
    """Decorator for a run function: `@method("egem", "posthoc", ...)` registers it and returns it unchanged."""

    def decorate(run: Callable) -> Callable:
        register(Method(name, kind, summary, paper, dict(hyperparameters), run=run, **extra))
        return run

    return decorate


def objective(summary: str, name: str | None = None, defaults: dict | None = None, **extra) -> Callable:
    """Decorator for a guided objective class (name, paper and defaults from its class attributes): registers a
    `finetune` method whose objective is `cls.create(model, loss, **hyperparameters)`."""

    def decorate(cls: type) -> type:
        register(Method(name or cls.name, "finetune", summary, cls.paper, dict(cls.defaults if defaults is None
                                                                                 else defaults),
                        build=cls.create, **extra))
        return cls

    return decorate


def register_runner(kind: str, run: Callable[..., object]) -> None:
    """The run function shared by every method of `kind` that has none of its own (the fine-tune sweep), called
    as `run(method, inputs, **options)`."""
    RUNNERS[kind] = run


def discover() -> None:
    """Import every module of `modelfix.repair` once, so every method file has registered itself."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("modelfix.repair")
    for info in pkgutil.walk_packages(package.__path__, prefix="modelfix.repair."):
        importlib.import_module(info.name)


def get_method(name: str) -> Method:
    """The entry for `name`; an unknown name raises ModelfixError listing the known ones."""
    discover()
    try:
        return METHODS[name]
    except KeyError:
        raise ModelfixError(f"unknown method '{name}'", hint=f"use one of: {', '.join(METHODS)}") from None


def list_methods(kind: str | None = None) -> list[Method]:
    """Every registered method (of `kind`): post hoc, pruning, fine-tunes, each by name."""
    discover()
    return sorted((m for m in METHODS.values() if kind is None or m.kind == kind),
                  key=lambda m: (KINDS.index(m.kind), m.name))


def check_options(entry: Method, options: dict) -> None:
    """Refuse an option the method does not declare, naming the valid ones."""
    unknown = [key for key in options if key not in entry.hyperparameters]
    if unknown:
        valid = ", ".join(entry.hyperparameters) or "none"
        raise ModelfixError(f"method '{entry.name}' has no hyper-parameter '{unknown[0]}'", hint=f"valid: {valid}")


def make_objective(name: str, model, loss: str = "ce", **hparams) -> object:
    """The training objective of finetune method `name` on `model`: defaults overridden by `hparams`."""
    entry = get_method(name)
    if entry.build is None:
        raise ModelfixError(f"'{name}' is a {entry.kind} method, not a fine-tune; it has no training objective "
                            "(post-hoc)",
                            hint=f"fine-tunes: {', '.join(m.name for m in list_methods('finetune'))}")
    check_options(entry, hparams)
    return entry.build(model, loss=loss, **{**entry.hyperparameters, **hparams})
