"""Hyper-parameter selection by the EGEM paper's slack rule (§4.4, Supp. G), shared by every post-hoc method.

Candidates are scanned from weakest to strongest; the chosen one is the *last* whose validation accuracy is within
the slack of the original model's. Selection never looks at test data (the authors' first `run.py` tracked the best
test accuracy; that leak is not reproduced).
"""

from __future__ import annotations

from collections.abc import Sequence

from modelfix.errors import ModelfixError

SLACK_MODES = ("relative", "absolute")


def check_slack(slack: float, mode: str = "relative") -> float:
    """`slack` as a float in [0, 1] and a known `mode`, or a one-line error naming the option."""
    if not 0.0 <= float(slack) <= 1.0:
        raise ModelfixError(f"--slack must be in [0, 1], got {slack}", hint="0.05 allows a 5 % relative accuracy loss")
    if mode not in SLACK_MODES:
        raise ModelfixError(f"--slack-mode must be one of {', '.join(SLACK_MODES)}, not '{mode}'")
    return float(slack)


def threshold(baseline: float, slack: float, mode: str = "relative") -> float:
    """The lowest validation accuracy that passes: `(1 − s)·baseline` (relative) or `baseline − s` (absolute)."""
    check_slack(slack, mode)
    return (1.0 - slack) * baseline if mode == "relative" else baseline - slack


def passes(val_accuracy: float, baseline: float, slack: float, mode: str = "relative") -> bool:
    """Whether one candidate is within the slack (float noise must not fail the identity candidate)."""
    return val_accuracy >= threshold(baseline, slack, mode) - 1e-12


def select_by_slack(val_accuracies: Sequence[float], baseline: float, slack: float, mode: str = "relative") -> int:
    """Index of the strongest candidate (candidates ordered weakest first) within the slack; 0 if none passes.

    The scan keeps the last passing candidate even where accuracy is not monotone in strength, as the paper does.
    """
    if not val_accuracies:
        raise ValueError("no candidates to select from")
    chosen = 0
    for index, acc in enumerate(val_accuracies):
        if passes(acc, baseline, slack, mode):
            chosen = index
    return chosen


def selection_table(name: str, candidates: Sequence, val_accuracies: Sequence[float], baseline: float, slack: float,
                    mode: str = "relative") -> tuple[int, list[dict]]:
    """(`select_by_slack` index, one trace row `{name: candidate, "val_acc", "passed"}` per candidate): the selection
    table every post-hoc method records, candidates ordered weakest first."""
    rows = [{name: c, "val_acc": acc, "passed": passes(acc, baseline, slack, mode)}
            for c, acc in zip(candidates, val_accuracies)]
    return select_by_slack(val_accuracies, baseline, slack, mode), rows
