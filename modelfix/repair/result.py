"""What a repair takes and what it gives back: `RepairInputs` (the model and the data a method may need) and the
typed `RepairResult` (the repaired copy, the selection, timings, warnings and the method's own details)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from modelfix.errors import ModelfixError
from modelfix.repair.registry import INPUTS, Method


class MissingInput(ModelfixError):
    """A method was asked to run without an input it cannot do without (masks, a clean pool, feedback)."""


@dataclass
class RepairInputs:
    """Everything a method may read. `data` is the training data (with masks where the user gave them), `clean`
    the pool of approved clean samples (post hoc), `val` validation data, `feedback` a verdicts file, `artifact` the
    spurious signal the counterfactual selection pastes (a spec or an `Artifact`; None: cut from the masks of `data`,
    if any). The model is never modified: every method repairs a copy."""

    model: nn.Module
    data: object | None = None
    clean: object | None = None
    val: object | None = None
    feedback: Path | None = None
    seed: int = 0
    progress: bool = True
    batch_size: int = 256
    artifact: object | None = None

    def available(self) -> set[str]:
        have = set()
        if self.data is not None:
            have.add("data")
            if bool(self.data.has_mask.any()):
                have.add("masks")
        if self.clean is not None:
            have.add("clean")
        if self.feedback is not None:
            have.update(("neuron_feedback", "sample_feedback"))
        return have

    def check(self, entry: Method) -> None:
        """One named error for the first input `entry` needs and does not have."""
        missing = [need for need in entry.needs if need not in self.available()]
        if missing:
            need = missing[0]
            detail = (" but no training image has one" if need == "masks" and self.data is not None else "")
            raise MissingInput(f"method '{entry.name}' needs {INPUTS[need]}{detail}")


@dataclass
class Selection:
    """How a hyper-parameter was chosen: the candidates, their scores, which one won and by which rule.

    `scores` are what the rule ranks by (`score_name`): the counterfactual worst-group accuracy under the
    counterfactual rule, clean validation accuracy otherwise; `clean_scores` are every candidate's clean validation
    accuracy (the slack's input) and `cf_scores` its counterfactual worst-group accuracy where one was measured."""

    parameter: str  # "alpha", "lambda", "beta", "epochs"
    values: list
    scores: list
    chosen: int
    rule: str
    score_name: str = "validation accuracy"
    passed: list | None = None
    clean_scores: list | None = None
    cf_scores: list | None = None

    @property
    def value(self):
        return self.values[self.chosen] if 0 <= self.chosen < len(self.values) else None

    def at_edge(self) -> bool:
        """The chosen value is the last candidate of a grid of three or more: the grid may be too narrow."""
        return len(self.values) >= 3 and self.chosen in (0, len(self.values) - 1)

    def rows(self) -> list[dict]:
        """One row per candidate for reports: value, score, passes, chosen (+ clean and counterfactual scores)."""
        none = [None] * len(self.values)
        passed, clean, cf = self.passed or none, self.clean_scores or none, self.cf_scores or none
        return [{"value": v, "score": s, "passed": p, "chosen": i == self.chosen, "clean_score": c, "cf_score": f}
                for i, (v, s, p, c, f) in enumerate(zip(self.values, self.scores, passed, clean, cf))]


@dataclass
class RepairResult:
    """The repaired model (a copy) and what the repair did. `details` is the method's own record (per-layer rows,
    the fold, the sweep's runs), JSON-safe."""

    model: nn.Module
    method: str
    kind: str
    settings: dict
    details: dict = field(default_factory=dict)
    selection: Selection | None = None
    timings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": self.method, "kind": self.kind, "settings": self.settings, "details": self.details,
                "selection": asdict(self.selection) if self.selection else None, "timings": self.timings,
                "warnings": list(self.warnings)}


def slack_result(model: nn.Module, kind: str, trace: dict, settings: dict, parameter: str) -> RepairResult:
    """A post-hoc method's (model, trace) as a RepairResult: the selection table becomes the Selection (ranked by
    the counterfactual score where the trace's rows have one, `cf_worst`, else by validation accuracy)."""
    rows = trace.get("selection") or []
    values = [row[parameter] for row in rows]
    chosen = values.index(trace[parameter]) if trace[parameter] in values else -1
    clean = [row["val_acc"] for row in rows]
    cf = [row["cf_worst"] for row in rows] if rows and "cf_worst" in rows[0] else None
    rule = trace.get("rule") or f"slack {trace['slack']:g} ({trace['slack_mode']})"
    selection = Selection(parameter, values, cf or clean, chosen, rule=rule,
                          score_name="counterfactual worst-group accuracy" if cf else "validation accuracy",
                          passed=[row["passed"] for row in rows], clean_scores=clean, cf_scores=cf) if rows else None
    details = {k: v for k, v in trace.items() if k not in ("warnings", "timing")}
    return RepairResult(model, trace["method"], kind, settings, details, selection,
                        dict(trace.get("timing", {})), list(trace.get("warnings", [])))
