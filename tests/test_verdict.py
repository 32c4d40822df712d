"""The repair verdict says loudly when the shortcut remains: the clean − poisoned gap not halved, clean accuracy down
more than 5 points, or no poisoned evaluation possible. Hand-made assessments; every expected number and string is
worked out by hand in the test."""

from __future__ import annotations

import json

import pytest
from torch import nn

from modelfix.app.repair import verdict
from modelfix.repair.result import RepairResult


def _row(accuracy: float, per_class=None) -> dict:
    return {"accuracy": accuracy, "per_class": per_class or {"a": accuracy, "b": accuracy}}


def _assessment(before: tuple, after: tuple) -> dict:
    """before/after: (clean, poisoned or None) accuracies."""
    def levels(pair):
        return {"levels": [_row(pair[0])] + ([_row(pair[1])] if pair[1] is not None else [])}
    return {"evaluation": {"data": "test", "before": levels(before), "after": levels(after)}}


RESULT = RepairResult(nn.Linear(1, 1), "rrr", "finetune", {})


def test_a_gap_not_halved_is_a_warning_with_the_numbers():
    # gap before 0.90 − 0.50 = 40 points; after 0.89 − 0.60 = 29 points > 40 / 2 = 20
    line, warnings = verdict(_assessment((0.90, 0.50), (0.89, 0.60)), RESULT)
    assert "gap 40.0 → 29.0 points (NOT halved: the shortcut remains)" in line
    assert len(warnings) == 1
    assert warnings[0].startswith("the shortcut remains: the clean − poisoned gap went from 40.0 to 29.0 points, "
                                  "not halved (a size of at most 20.0 was needed)")
    # what to try next: the other commands (not the fine-tune that just ran), an artifact, a wider search
    assert "`prune-egem --clean-dir DIR`" in warnings[0] and "`refit --method ridge" in warnings[0]
    assert "`finetune --method" not in warnings[0]
    assert "--artifact or --masks" in warnings[0] and "--lambda" in warnings[0]


def test_a_halved_gap_at_a_small_clean_cost_passes():
    # gap 40 → 0.88 − 0.70 = 18 ≤ 20; clean down 2 points
    line, warnings = verdict(_assessment((0.90, 0.50), (0.88, 0.70)), RESULT)
    assert line == "rrr: clean 90.0 → 88.0 %, poisoned 50.0 → 70.0 %, gap 40.0 → 18.0 points (halved), " \
                   "worst class 'a' 88.0 % (on test)"
    assert warnings == []


def test_exactly_half_and_exactly_five_points_pass():
    # gap 0.80 − 0.40 = 40 → 0.75 − 0.55 = 20 (exactly half); clean 80 → 75 (exactly 5 points)
    _, warnings = verdict(_assessment((0.80, 0.40), (0.75, 0.55)), RESULT)
    assert warnings == []


def test_clean_accuracy_down_more_than_five_points_is_a_warning():
    # gap 40 → 0.84 − 0.80 = 4 (halved) but clean 90 → 84: 6 points
    line, warnings = verdict(_assessment((0.90, 0.50), (0.84, 0.80)), RESULT)
    assert "(halved)" in line
    assert len(warnings) == 1
    assert warnings[0].startswith("clean accuracy fell 6.0 points (90.0 → 84.0 %), more than 5")


def test_the_size_of_the_gap_counts_not_its_sign():
    # decoy-digits: 34 % clean, 61 % with a random-colour patch (gap −27); after 78 / 77.5 (gap 0.5): halved
    _, warnings = verdict(_assessment((0.34, 0.61), (0.78, 0.775)), RESULT)
    assert warnings == []
    # −27 → −20: |−20| > 13.5, not halved
    line, warnings = verdict(_assessment((0.34, 0.61), (0.40, 0.60)), RESULT)
    assert "gap -27.0 → -20.0 points (NOT halved" in line
    assert warnings[0].startswith("the shortcut remains: the clean − poisoned gap went from -27.0 to -20.0 points, "
                                  "not halved (a size of at most 13.5 was needed)")


def test_no_shortcut_before_means_nothing_to_halve():
    # gap 0.90 − 0.89 = 1 point < 2
    line, warnings = verdict(_assessment((0.90, 0.89), (0.90, 0.90)), RESULT)
    assert "(no shortcut seen before the repair)" in line and warnings == []


def test_without_an_artifact_the_verdict_says_the_shortcut_was_not_checked():
    line, warnings = verdict(_assessment((0.90, None), (0.89, None)), RESULT)
    assert "shortcut not checked (no artifact known)" in line
    assert [w for w in warnings if w.startswith("the shortcut was not checked: no artifact is known")]
    assert "--artifact" in warnings[0]


def test_without_evaluation_data_a_repair_says_so_and_a_model_trained_from_scratch_does_not():
    line, warnings = verdict({}, RESULT)
    assert line == "rrr: shortcut not checked (no evaluation data)"
    assert len(warnings) == 1 and "--eval-data" in warnings[0] and "--artifact" in warnings[0]
    assert verdict({}, RESULT, repaired=False) == (None, [])


@pytest.mark.slow
def test_strict_exits_1_when_the_shortcut_remains(shortcut, tmp_path):
    """prune-egem at α = 1 changes nothing, so the decoy-digits shortcut's gap stays what it was: the verdict warns
    that it remains (and --strict turns that into exit 1); the report's verdict carries the same line."""
    from cli_helpers import run

    common = ("prune-egem", shortcut, "--scenario", "decoy-digits", "--alpha", "1", "--samples-per-class", "20", "--keep-incorrect",
              "--eval-data", "decoy-digits:test", "--artifact", "corner-patch")
    result = run(*common, "-o", tmp_path / "a.safetensors", "--report", tmp_path / "report", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    before, after = (doc["evaluation"][p]["levels"] for p in ("before", "after"))
    gap_before = before[0]["accuracy"] - before[1]["accuracy"]
    assert abs(gap_before) > 0.02 and after[0]["accuracy"] - after[1]["accuracy"] == pytest.approx(gap_before)
    assert "NOT halved" in doc["verdict"] and "the shortcut remains" in result.stderr
    assert "`finetune --method rrr --masks DIR`" in result.stderr and "`prune-egem --clean-dir" not in result.stderr
    assert "NOT halved" in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "NOT halved" in (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    strict = run(*common, "-o", tmp_path / "b.safetensors", "--strict")
    assert strict.exit_code == 1, strict.stderr
    assert "the shortcut remains" in strict.stderr and "--strict:" in strict.stderr
    assert (tmp_path / "b.safetensors").exists()  # written, so it can be inspected
