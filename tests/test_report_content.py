"""What the reports say: the verdict and warnings first, signed changes, the chance level beside relevance mass,
hostile strings escaped in report.md and report.html, the merged comparison per condition, and the heatmap
helpers (class-balanced items, artifact outlines, colour bars)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from modelfix.assessment import balanced_indices
from modelfix.explain.heatmap import CMAPS, OUTLINE, colorbar, outline
from modelfix.markup import escape_md, md_code
from modelfix.report import render_markdown, render_repair_markdown
from modelfix.report_html import markdown_to_html, render_html
from modelfix.summary import compare_runs, render_comparison_markdown, verdict

from test_report_html import Page, evaluate_results, level, repair_results, well_formed

HOSTILE = ["<img src=x onerror=alert(1)>", "<script>alert(2)</script>", "[x](javascript:alert(3))",
           "![i](http://evil/x.png)", "a|b", "**bold** `code` _em_", "&lt;amp", "line\nbreak"]


def visible(text: str) -> str:
    return " ".join("".join(Page(text).text).split())


# ---- report.md and the page built from it --------------------------------------------------------------------


def test_escape_md_keeps_text_literal():
    for s in HOSTILE:
        escaped = escape_md(s)
        # no unescaped markup character survives: every one is preceded by a backslash
        assert not re.search(r"(?<!\\)[<>\[\]()|*`_&!]", escaped.replace("\\\\", "")), escaped
        assert "\n" not in escaped
        # the in-house renderer shows exactly the original text (line breaks become spaces)
        assert visible(markdown_to_html(escaped)) == " ".join(s.split())
    assert md_code("a ``b`` c") == "```a ``b`` c```" and md_code("`x") == "`` `x ``"


def test_render_markdown_escapes_every_user_string():
    results = evaluate_results()
    results["model"]["path"] = "runs/<script>alert(1)</script>.safetensors"
    results["model"]["arch"] = HOSTILE[0]
    results["settings"]["labels"] = [HOSTILE[2]]
    results["levels"][1]["labels"] = HOSTILE[0]
    results["levels"][1]["worst_group"] = HOSTILE[1]
    for row in results["levels"]:
        row["per_group"] = {HOSTILE[0]: 0.5, "[x](javascript:alert(3))": 0.25}
    md = render_markdown(results)
    outside_code = re.sub(r"`[^`]*`", "", md).replace("\\<", "")
    raw_html = re.findall(r"<[^>]*>", outside_code)
    assert raw_html == [] and "](javascript" not in md.replace("\\]\\(javascript", "")
    page = markdown_to_html(md)
    assert "<img" not in page and "<script" not in page and "href" not in page
    shown = visible(page)
    assert HOSTILE[0] in shown and "runs/<script>alert(1)</script>.safetensors" in shown
    assert "[x](javascript:alert(3))" in shown and "50.00" in shown and "25.00" in shown


def test_repair_markdown_escapes_and_puts_warnings_first():
    doc = {"command": "prune-egem", "model": "m<b>.safetensors", "output": "out`.safetensors",
           "data": {"spec": "folder:<img src=x>", "n": 3, "checksum": "c"},
           "trace": {"method": HOSTILE[2], "alpha": 0.5, "slack": 0.1, "slack_mode": "rel", "selected_by": "slack",
                     "val_orig": 0.9, "val_acc": 0.88, "samples": {"pool": HOSTILE[1]},
                     "layers": [{"name": HOSTILE[0], "kind": "conv", "tau": 0.5, "lambda": 1.0, "mean_factor": 0.9}],
                     "warnings": ["class <img src=x onerror=alert(1)> has 2 items"]}}
    md = render_repair_markdown(doc)
    lines = md.splitlines()
    assert lines[2].startswith("> **Warning:** class \\<img")  # right under the title
    page = markdown_to_html(md)
    assert "<img" not in page and "<script" not in page and "href" not in page
    assert '<blockquote class="warning">' in page
    shown = visible(page)
    for s in (HOSTILE[0], HOSTILE[1], HOSTILE[2], "m<b>.safetensors", "out`.safetensors", "folder:<img src=x>"):
        assert s in shown, s


def test_signed_changes_in_evaluate_markdown():
    md = render_markdown(evaluate_results())
    # stored drop 0.835 (first minus other) reads as a fall of 83.50 points; a rise would read +
    assert "accuracy -83.50" in md and "worst-group -91.00" in md and "Drops" not in md
    results = evaluate_results()
    results["drops"][0]["accuracy"] = -0.04
    assert "accuracy +4.00" in render_markdown(results)


# ---- the run page: verdict, warnings, chance -------------------------------------------------------------------


def test_verdict_and_warnings_come_first():
    results = repair_results()
    for phase in ("before", "after"):
        for row in results["evaluation"][phase]["levels"]:
            row["per_class"] = {"cat<i>": row["accuracy"] - 0.1, "dog": row["accuracy"]}
    results["warnings"] = ["only <b>3</b> samples"]
    results["trace"] = {"warnings": ["slack not met", "only <b>3</b> samples"]}
    text = render_html(results, "")
    well_formed(text)
    shown = visible(text)
    order = [shown.index(s) for s in ("Warnings", "Verdict", "Accuracy", "Heatmaps", "Artifact reliance")]
    assert order == sorted(order)
    top = shown.split("Verdict")[0]
    assert top.count("only <b>3</b> samples") == 1 and "slack not met" in top and "<b>3" not in text
    # before → after computed independently from the fixture's numbers
    assert "98.12 % → 97.34 % change -0.78 points" in shown
    assert "41.23 % → 89.01 % change +47.78 points" in shown
    gap_before, gap_after = 100 * (0.9812 - 0.4123), 100 * (0.9734 - 0.8901)
    assert f"{gap_before:.2f} → {gap_after:.2f} change {gap_after - gap_before:+.2f} points" in shown
    assert f"cat<i>: {100 * (0.4123 - 0.1):.2f} % → cat<i>: {100 * (0.8901 - 0.1):.2f} %" in shown


def test_document_verdict_wins_and_summary_is_shown():
    results = repair_results()
    results["verdict"] = {"summary": "Repaired <well>.", "phases": ["before", "after"],
                          "clean_accuracy": {"before": 0.5, "after": 0.25}}
    shown = visible(render_html(results, ""))
    assert "Repaired <well>." in shown and "50.00 % → 25.00 % change -25.00 points" in shown
    assert "poisoned accuracy" not in shown.split("Accuracy")[0]


def test_verdict_prefers_random_labels_and_recomputes_groups():
    rows = [level(0.0, None, 0, 0.96, 0.95, 0.9, "x"), level(1.0, "correlated", 9, 0.99, 0.99, 0.98, "x"),
            level(1.0, "random", 9, 0.2, 0.2, 0.0, "stale")]
    rows[2]["per_group"] = {"a": 0.3, "b": 0.1}
    v = verdict({"command": "evaluate", "levels": rows})
    assert v["condition"] == {"level": 1.0, "labels": "random"} and v["phases"] == ["after"]
    assert v["gap"]["after"] == pytest.approx(0.76) and v["worst_class"]["after"] == {"name": "b", "accuracy": 0.1}


def test_reliance_shows_chance_beside_relevance_mass():
    results = repair_results()
    for phase in ("before", "after"):
        results["reliance"][phase][0]["mask_share"] = 0.0204
    text = render_html(results, "")
    page = Page(text)
    assert "chance %" in page.text
    cells = [t.strip() for t in page.text if t.strip()]
    i = cells.index("65.43")
    assert cells[i:i + 3] == ["65.43", "12.34", "2.04"]


# ---- modelfix report: merging per condition --------------------------------------------------------------------


def evaluate_with_two_modes(clean, correlated, random, groups):
    rows = [level(0.0, None, 0, clean, clean, clean, "0"),
            level(1.0, "correlated", 10, correlated, correlated, 0.0, "0"),
            level(1.0, "random", 10, random, random, 0.0, "0")]
    rows[2]["per_group"] = groups
    return {"command": "evaluate", "model": {"path": "runs/shortcut.safetensors"}, "levels": rows}


def test_compare_runs_merges_per_condition_and_names_the_output():
    shortcut = evaluate_with_two_modes(0.96, 0.99, 0.12, {"0": 0.3, "7": 0.05})
    repair = repair_results()
    repair["evaluation"]["after"]["levels"][1]["per_group"] = {"2": 0.7715, "4": 0.95}
    doc = compare_runs({"shortcut": shortcut, "egem": repair}, paths={"egem": "runs/egem"})
    assert doc["conditions"] == [{"level": 1.0, "labels": "random"}, {"level": 1.0, "labels": "correlated"}]
    first, second = doc["runs"]
    # headline: random labels (a positive gap), not the first label mode in the file
    assert (first["poisoned_labels"], first["poisoned_accuracy"]) == ("random", 0.12)
    assert first["gap"] == pytest.approx(0.84) and (first["worst_group_accuracy"], first["worst_group"]) == (0.05, "7")
    correlated = first["by_condition"][1]
    assert correlated["gap"] == pytest.approx(-0.03) and correlated["accuracy"] == 0.99
    assert second["by_condition"][1] is None  # the repair was not evaluated with correlated labels
    assert second["model"] == "runs/egem.safetensors" and first["model"] == "runs/shortcut.safetensors"
    assert second["path"] == "runs/egem" and second["gap"] == pytest.approx(0.9734 - 0.8901)
    assert (second["worst_group_accuracy"], second["worst_group"]) == (0.7715, "2")
    assert (second["clean_worst_group_accuracy"], second["clean_worst_group"]) == (0.9402, "1")
    md = render_comparison_markdown(doc)
    assert "## poison 1 random (headline)" in md and "## poison 1 correlated" in md
    assert "| shortcut | 12.00 | +84.00 | 5.00 (7) | – |" in md and "| shortcut | 99.00 | -3.00 |" in md
    assert "| egem | – | – | – | – |" in md and "model `runs/egem.safetensors`" in md


def test_comparison_markdown_escapes_run_names():
    doc = compare_runs({"<img src=x onerror=alert(1)>": evaluate_with_two_modes(0.9, 0.9, 0.1, {"a|b": 0.1})})
    page = markdown_to_html(render_comparison_markdown(doc))
    assert "<img" not in page and "<img src=x onerror=alert(1)>" in visible(page) and "a|b" in visible(page)


# ---- heatmap helpers -------------------------------------------------------------------------------------------


def test_balanced_indices_round_robin_over_classes():
    y = torch.tensor([3, 3, 3, 1, 3, 0, 1, 3])
    assert balanced_indices(y, 3) == [5, 3, 0]
    assert balanced_indices(y, 6) == [5, 3, 0, 6, 1, 2]
    assert balanced_indices(y, 100) == [5, 3, 0, 6, 1, 2, 4, 7]
    assert balanced_indices(y, 0) == []


def test_outline_rings_the_mask_outside_only():
    rgb = np.full((6, 6, 3), 255, dtype=np.uint8)  # a white tag on white
    mask = np.zeros((6, 6), dtype=bool)
    mask[2:4, 2:4] = True
    out = outline(rgb, mask)
    ring = np.all(out == OUTLINE, axis=2)
    expected = np.zeros((6, 6), dtype=bool)
    expected[1, 2:4] = expected[4, 2:4] = expected[2:4, 1] = expected[2:4, 4] = True
    assert (ring == expected).all() and (out[mask] == 255).all()


def test_colorbar_runs_from_minus_through_neutral_to_plus():
    bar = colorbar("bwr", width=129, height=4)
    assert bar.shape == (4, 129, 3) and bar.dtype == np.uint8
    anchors, colours = CMAPS["bwr"]
    assert (bar[:, 0] == colours[0]).all() and (bar[:, 64] == colours[1]).all() and (bar[:, -1] == colours[2]).all()
