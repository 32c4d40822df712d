"""`modelfix demo --quick` end to end: the shortcut is there, every repair shrinks it, the files agree."""

from __future__ import annotations

import json
import math
import re

import pytest

from cli_helpers import assert_one_line_error, run
from modelfix.demo import REPAIRS, SHORTCUT_ROW, stages


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    result = run("demo", "--quick", "-o", out)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return out, result


def test_quick_demo_table_and_files(quick):
    out, result = quick
    results = json.loads((out / "results.json").read_text())
    names = [row["name"] for row in results["rows"]]
    assert names == [SHORTCUT_ROW, *(name for name, _, _ in REPAIRS)]
    assert {"EGEM", "PCA-EGEM", "RGEM", "Ridge", "CRAYON-PRUNING", "TAP", "RRR", "Cert-R4"} <= set(names)
    for name in names:  # one table row per model, on stdout
        assert name.split(" ")[0][:8] in result.stdout
    for stage in stages():  # the progress display names every stage as it finishes
        assert stage in result.stderr
    shortcut, *repairs = results["rows"]
    for row in results["rows"]:
        assert all(math.isfinite(row[k]) and 0 <= row[k] <= 1 for k in ("clean", "poisoned"))
        assert row["gap"] == pytest.approx(row["clean"] - row["poisoned"])
    # the shortcut: pasting the tag costs the model a lot of accuracy
    assert shortcut["gap"] > 0.15
    # every repair shrinks it; all but one to under half, most to under a fifth (measured at seed 0, --quick: RGEM
    # leaves 0.66 of it — its slack-rule λ sits on the validation threshold with this refinement sample —, TAP
    # 0.32, the others under 0.2; docs/getting-started.md)
    for row in repairs:
        assert row["gap"] < shortcut["gap"], row
    assert sum(row["gap"] < 0.5 * shortcut["gap"] for row in repairs) >= 7
    assert sum(row["gap"] < shortcut["gap"] / 5 for row in repairs) >= 6
    assert results["files"]["model"].endswith("shortcut.safetensors") and (out / "shortcut.safetensors").is_file()


def test_quick_demo_html_holds_the_numbers_and_images(quick):
    out, _ = quick
    results = json.loads((out / "results.json").read_text())
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "http://" not in html.replace("http://www.w3.org", "") and "<script" not in html  # self-contained
    for row in results["rows"]:
        assert f"{100 * row['clean']:.1f}" in html and f"{100 * row['poisoned']:.1f}" in html
    # one heatmap per model and sample, plus the input, embedded as PNG
    items = results["heatmaps"]["items"]
    assert len(items) == 6 and all(len(item) >= 2 + len(results["rows"]) for item in items)
    images = re.findall(r'<img [^>]*src="data:image/png;base64,', html)
    assert len(images) >= len(items) * (1 + len(results["rows"]))


def test_demo_refuses_a_file_as_output(tmp_path):
    target = tmp_path / "taken.txt"
    target.write_text("mine")
    assert_one_line_error(run("demo", "--quick", "-o", target), "taken.txt")
    assert target.read_text() == "mine"
