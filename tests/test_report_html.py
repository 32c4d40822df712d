"""report.html (self-contained, well formed, the numbers and images of results.json), the markdown subset, the
charts with and without matplotlib, and `modelfix report DIR… -o OUT`."""

from __future__ import annotations

import base64
import io
import json
import sys
from html.parser import HTMLParser

import pytest
from PIL import Image

from modelfix import charts
from modelfix.report import render_markdown
from modelfix.report_html import NO_CHART, markdown_to_html, render_html, render_comparison_html, write_html

from cli_helpers import assert_one_line_error, run
import modelfix.cli  # noqa: F401,E402  (registers every command)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """Checks that every non-void element is closed in order, and collects tags and attributes."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack, self.tags, self.attrs, self.errors, self.text = [], [], [], [], []
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {self.stack}")

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]
        if tag not in VOID:
            self.errors.append(f"self-closed non-void <{tag}/>")

    def handle_endtag(self, tag):
        if tag in VOID:
            self.errors.append(f"end tag for void <{tag}>")
        elif not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)

    @property
    def images(self) -> list[bytes]:
        prefix = "data:image/png;base64,"
        return [base64.b64decode(v[len(prefix):], validate=True) for tag, k, v in self.attrs
                if tag == "img" and k == "src" and v.startswith(prefix)]


def well_formed(text: str) -> Page:
    page = Page(text)
    assert not page.errors, page.errors[:5]
    assert text.startswith("<!DOCTYPE html>")
    assert page.tags[:1] == ["html"] and "script" not in page.tags
    # self-contained: no reference to anything outside the file
    assert all(not str(v).lower().startswith(("http:", "https:", "//")) for _, _, v in page.attrs)
    assert "http://" not in text and "https://" not in text and "url(" not in text
    return page


def png(colour, size=(5, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def level(lvl, labels, n, acc, macro, worst, group):
    return {"level": lvl, "labels": labels, "n_poisoned": n, "accuracy": acc, "macro_group_accuracy": macro,
            "worst_group_accuracy": worst, "worst_group": group, "per_group": {"0": acc, "1": worst}}


HEATMAPS = [png((255, 0, 0)), png((0, 0, 255)), png((0, 255, 0)), png((9, 9, 9)), png((200, 200, 200), (3, 3))]


def repair_results() -> dict:
    return {
        "schema": "modelfix.results/v1", "command": "prune-egem", "method": "egem",
        "model": "runs/shortcut.safetensors", "output": "runs/egem.safetensors",
        "evaluation": {
            "before": {"levels": [level(0.0, None, 0, 0.9812, 0.9790, 0.9511, "4"),
                                  level(1.0, "random", 200, 0.4123, 0.4001, 0.0532, "7")]},
            "after": {"levels": [level(0.0, None, 0, 0.9734, 0.9702, 0.9402, "4"),
                                 level(1.0, "random", 200, 0.8901, 0.8813, 0.7715, "2")]},
        },
        "reliance": {
            "before": [{"level": 1.0, "labels": "random", "region": "pasted", "n": 200, "relevance_mass": 0.6543,
                        "top_quartile_recall": 0.8125, "top_quartile_precision": 0.3333, "pointing_game": 0.91}],
            "after": [{"level": 1.0, "labels": "random", "region": "pasted", "n": 200, "relevance_mass": 0.1234,
                       "top_quartile_recall": 0.2500, "top_quartile_precision": 0.0625, "pointing_game": 0.05}],
        },
        "selection": {"parameter": "λ", "score_name": "validation accuracy", "rows": [
            {"value": 1.0, "score": 0.9900, "chosen": False, "passed": True},
            {"value": 64.0, "score": 0.9577, "chosen": True, "passed": True},
            {"value": 128.0, "score": 0.8011, "chosen": False, "passed": False}]},
        "heatmaps": {"method": "gradient", "items": [
            {"index": 3, "label": "seven", "input": b64(HEATMAPS[0]), "before": b64(HEATMAPS[1]), "after": b64(HEATMAPS[2])},
            {"index": 9, "label": "two", "input": b64(HEATMAPS[3]), "before": b64(HEATMAPS[4]),
             "after": "data:image/png;base64," + b64(HEATMAPS[0])}]},
        "note": "<script>alert('x')</script>",
    }


def evaluate_results() -> dict:
    return {
        "schema": "modelfix.results/v1", "command": "evaluate",
        "model": {"path": "runs/m.safetensors", "sha256": "ab" * 32, "arch": "mlp", "num_classes": 10},
        "data": {"spec": "decoy-digits:test", "n": 500, "checksum": "c0ffee"},
        "settings": {"artifact": "corner-patch", "labels": ["random", "correlated"], "seed": 0},
        "levels": [level(0.0, None, 0, 0.9600, 0.9550, 0.9100, "3"),
                   level(0.5, "random", 250, 0.7000, 0.6900, 0.2000, "5"),
                   level(1.0, "random", 500, 0.1250, 0.1200, 0.0000, "8"),
                   level(1.0, "correlated", 500, 0.9990, 0.9980, 0.9950, "1")],
        "drops": [{"from": 0.0, "to": 1.0, "labels": "random", "accuracy": 0.835, "macro_group_accuracy": 0.835,
                   "worst_group_accuracy": 0.91}],
        "definitions": {"accuracy": "share of items predicted correctly", "worst-group": "lowest group <accuracy>"},
        "reliance": {"method": "lrp", "composite": "epsilon_plus_flat", "items": 500, "target": "true label",
                     "levels": [reliance_row(0.0, None, "footprint", 0.0211, {"relevance_mass": "share <inside>"}),
                                reliance_row(1.0, "random", "pasted", 0.7777)]},
    }


def reliance_row(lvl, labels, region, mass, definitions=None):
    row = {"level": lvl, "labels": labels, "region": region, "n": 500, "relevance_mass": mass,
           "top_quartile_recall": 0.5, "top_quartile_precision": 0.125, "pointing_game": 0.0}
    return row if definitions is None else {**row, "definitions": definitions}


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Every matplotlib import fails, as on an install without the [report] extra."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


# ---- markdown -----------------------------------------------------------------------------------------------------


def test_markdown_subset_exact():
    text = ("# Title `x<y>`\n\nfirst line\nsecond **bold** & `a|b`\n\n- one `c`\n- two\n  continued\n\n"
            "| k | v % | c |\n|---|---:|:---:|\n| a **(chosen)** | 1.50 | x |\n| b \\| c | 2 |\n\n### Small")
    assert markdown_to_html(text) == "\n".join([
        "<h1>Title <code>x&lt;y&gt;</code></h1>",
        "<p>first line second <strong>bold</strong> &amp; <code>a|b</code></p>",
        "<ul>", "<li>one <code>c</code></li>", "<li>two continued</li>", "</ul>",
        '<div class="scroll"><table>',
        '<thead><tr><th>k</th><th class="num">v %</th><th class="center">c</th></tr></thead>',
        "<tbody>",
        '<tr><td>a <strong>(chosen)</strong></td><td class="num">1.50</td><td class="center">x</td></tr>',
        '<tr><td>b | c</td><td class="num">2</td><td class="center"></td></tr>',
        "</tbody></table></div>",
        "<h3>Small</h3>",
    ])
    assert markdown_to_html("## Two", heading_offset=2) == "<h4>Two</h4>"


def test_markdown_escapes_script_everywhere():
    text = ("# <script>alert(1)</script>\n\n<script>alert(2)</script>\n\n- <img src=x onerror=alert(3)>\n\n"
            "| `<script>` | **<b>** |\n|---|---|\n| <script>alert(4)</script> | \"q\" |")
    out = markdown_to_html(text)
    page = Page(out)
    assert not page.errors
    assert "script" not in page.tags and "img" not in page.tags and "b" not in page.tags
    assert "<script" not in out and "&lt;script&gt;alert(2)&lt;/script&gt;" in out
    assert "&lt;img src=x onerror=alert(3)&gt;" in out and "&quot;q&quot;" in out


def test_markdown_of_an_evaluate_report_keeps_its_tables():
    results = evaluate_results()
    out = markdown_to_html(render_markdown(results))
    page = Page(out)
    assert not page.errors
    assert page.tags.count("table") == 3  # the levels, the per-group accuracy, the reliance
    assert page.tags.count("ul") == 3  # model/data/artifact, the drops, the reliance definitions
    text = "".join(page.text)
    for number in ("96.00", "12.50", "99.90", "0.00 (8)", "83.50", "77.77", "12.50"):
        assert number in text
    assert "lowest group <accuracy>" in text and "&lt;accuracy&gt;" in out and "share <inside>" in text


# ---- charts -------------------------------------------------------------------------------------------------------


def test_log_scale_rule():
    assert charts.log_scale([1.0, 2.0, 1000.0])
    assert not charts.log_scale([1.0, 5.0, 10.0])
    assert not charts.log_scale([0.0, 10.0, 1000.0]) and not charts.log_scale([-1.0, 100.0]) and not charts.log_scale([])


def test_charts_are_pngs_with_matplotlib():
    pytest.importorskip("matplotlib")
    assert charts.has_matplotlib()
    pyplot_before = "matplotlib.pyplot" in sys.modules
    bars = charts.accuracy_bars({"before": {"clean": 0.98, "poison 1 random": 0.41},
                                 "after": {"clean": 0.97, "poison 1 random": float("nan")}}, "accuracy")
    trace = charts.selection_plot([{"value": 2.0 ** i, "score": 0.9 - 0.01 * i, "chosen": i == 3, "passed": i < 4}
                                   for i in range(8)] + [{"value": None, "score": 0.5}], "λ", "validation accuracy",
                                  percent=True)
    merged = charts.comparison_bars({"a": {"clean": 0.9, "poisoned": 0.1}, "b": {"clean": 0.8}})
    for data in (bars, trace, merged):
        assert data.startswith(PNG_MAGIC)
        width, height = Image.open(io.BytesIO(data)).size
        assert width > 200 and height > 150
    assert pyplot_before or "matplotlib.pyplot" not in sys.modules  # the charts never go through pyplot


def test_charts_fall_back_to_none(no_matplotlib):
    assert not charts.has_matplotlib()
    assert charts.accuracy_bars({"accuracy": {"clean": 0.9}}, "t") is None
    assert charts.selection_plot([{"value": 1.0, "score": 0.5, "chosen": True}], "λ", "score") is None
    assert charts.comparison_bars({"a": {"clean": 0.9}}) is None


# ---- the run page -------------------------------------------------------------------------------------------------


def test_repair_page_is_self_contained_with_numbers_and_images(tmp_path):
    pytest.importorskip("matplotlib")
    results = repair_results()
    path = write_html(tmp_path, results, "# modelfix prune-egem: egem\n\n- model: `runs/shortcut.safetensors`\n")
    assert path == tmp_path / "report.html" and [p.name for p in tmp_path.iterdir()] == ["report.html"]
    text = path.read_text(encoding="utf-8")
    page = well_formed(text)
    shown = "".join(page.text)
    # before/after accuracy, the change in points, worst-group with its group, reliance, the selection trace
    for number in ("98.12", "41.23", "97.34", "89.01", "+47.78", "-0.78", "5.32 (7)", "77.15 (2)", "65.43", "12.34",
                   "81.25", "25.00", "95.77", "64 (chosen)", "80.11"):
        assert number in shown, number
    # 6 heatmaps (2 samples × input/before/after) + a colour bar per sample + the accuracy chart + the selection
    # plot, all PNGs
    images = page.images
    assert text.count("data:image/png;base64,") == len(images) == 10
    assert all(image.startswith(PNG_MAGIC) for image in images)
    assert [image for image in images if image in HEATMAPS] == [HEATMAPS[i] for i in (0, 1, 2, 3, 4, 0)]
    assert NO_CHART not in text
    # text from results.json is escaped; the raw JSON is there without the image payloads
    assert "<script>" not in text and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in text
    assert "details" in page.tags and "PNG image, " in shown and shown.count(b64(HEATMAPS[3])) == 0
    assert "<title>modelfix prune-egem: egem</title>" in text


def test_evaluate_page_without_matplotlib_keeps_tables(no_matplotlib):
    results = evaluate_results()
    text = render_html(results, render_markdown(results))
    page = well_formed(text)
    shown = "".join(page.text)
    assert NO_CHART in shown and page.images == [] and "img" not in page.tags
    for number in ("96.00", "70.00", "12.50", "99.90", "0.00 (8)", "2.11", "77.77"):
        assert number in shown, number
    assert "Explanations: lrp (epsilon_plus_flat), first 500 items, explaining the true label." in shown
    # the metrics table, the reliance table and the three tables of report.md
    assert page.tags.count("table") == 5


def test_page_skips_invalid_images_and_missing_sections():
    results = {"command": "finetune", "heatmaps": {"items": [{"index": 0, "before": "not-base64!",
                                                              "after": b64(b"GIF89a....")}]},
               "reliance": [{"level": 1.0, "labels": "random", "n": 7, "relevance_mass": 0.4321}]}
    page = well_formed(render_html(results, ""))
    shown = "".join(page.text)
    assert page.images == [] and shown.count("–") >= 2
    assert "Accuracy" not in shown and "Selection" not in shown  # no levels, no selection: no such sections
    assert "relevance mass %" in shown and "43.21" in shown and "pointing game" not in shown


# ---- modelfix report ----------------------------------------------------------------------------------------------


def write_run(folder, results):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return folder


def test_report_command_merges_runs(tmp_path):
    a = write_run(tmp_path / "shortcut", evaluate_results())
    b = write_run(tmp_path / "egem", repair_results())
    out = tmp_path / "merged"
    result = run("report", a, b, "-o", out)
    assert result.exit_code == 0, result.stderr
    for fragment in ("shortcut", "prune-egem: egem", "96.00", "12.50", "+83.50", "97.34", "89.01", "+8.33", "77.77",
                     "12.34"):
        assert fragment in result.stdout, fragment
    doc = json.loads((out / "comparison.json").read_text())
    first, second = doc["runs"]
    assert (first["run"], first["source"], first["poisoned_level"], first["poisoned_labels"]) == \
        ("shortcut", "levels", 1.0, "random")
    assert first["clean_accuracy"] == 0.96 and first["poisoned_accuracy"] == 0.125
    assert first["worst_group_accuracy"] == 0.0 and first["relevance_mass"] == 0.7777
    assert (second["run"], second["source"], second["method"]) == ("egem", "evaluation.after", "egem")
    assert second["clean_accuracy"] == 0.9734 and second["poisoned_accuracy"] == 0.8901
    assert second["gap"] == pytest.approx(0.0833, abs=1e-12) and second["worst_group_accuracy"] == 0.7715
    assert second["relevance_mass"] == 0.1234
    markdown = (out / "report.md").read_text()  # one table per condition, the headline (poison 1, random) first
    assert "| egem | prune-egem | egem | 97.34 |" in markdown and "| egem | 89.01 | +8.33 | 77.15 (1) | 12.34 |" in markdown
    html_text = (out / "report.html").read_text()
    page = well_formed(html_text)
    assert "97.34" in "".join(page.text)
    assert len(page.images) == (1 if charts.has_matplotlib() else 0)
    assert all(image.startswith(PNG_MAGIC) for image in page.images)

    as_json = run("report", a, b, "-o", out, "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == doc


def test_comparison_page_without_matplotlib(no_matplotlib):
    doc = {"runs": [{"run": "a", "clean_accuracy": 0.5, "poisoned_accuracy": None}]}
    page = well_formed(render_comparison_html(doc, "| run | clean % |\n|---|---:|\n| a | 50.00 |"))
    assert NO_CHART in "".join(page.text) and "50.00" in "".join(page.text) and page.images == []


def test_report_command_errors(tmp_path):
    good = write_run(tmp_path / "good", evaluate_results())
    assert_one_line_error(run("report", good, tmp_path / "absent", "-o", tmp_path / "o"), "absent", "no such folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("report", tmp_path / "empty", "-o", tmp_path / "o"), str(tmp_path / "empty" / "results.json"), "no such file")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text('{"command": "evaluate",')
    assert_one_line_error(run("report", good, bad, "-o", tmp_path / "o"), str(bad / "results.json"), "invalid JSON")
    (bad / "results.json").write_text('[1, 2]')
    assert_one_line_error(run("report", bad, "-o", tmp_path / "o"), "results.json", "command")
    assert_one_line_error(run("report", good, "-o", good), "-o", "input")
    assert not (tmp_path / "o").exists()  # nothing written when an input is bad


def test_summaries_of_other_shapes(tmp_path):
    from modelfix.summary import compare_runs, run_names

    def summarise(name, path, results):
        return compare_runs({name: results})["runs"][0]

    results = repair_results()
    results["reliance"] = {phase: {"method": "lrp", "items": 200, "levels": rows}
                           for phase, rows in results["reliance"].items()}
    row = summarise("x", tmp_path, results)
    assert (row["relevance_mass"], row["poisoned_accuracy"], row["source"]) == (0.1234, 0.8901, "evaluation.after")
    shown = "".join(Page(render_html(results, "")).text)
    assert "65.43" in shown and "12.34" in shown and "Explanations: lrp, first 200 items." in shown
    empty = summarise("y", tmp_path, {"command": "finetune", "method": "rrr"})
    assert empty["source"] is None and all(empty[k] is None for k in ("clean_accuracy", "gap", "relevance_mass"))
    for name in ("a/run", "b/run", "c/other"):
        (tmp_path / name).mkdir(parents=True)
    paths = [tmp_path / "a/run", tmp_path / "b/run", tmp_path / "c/other"]
    assert run_names(paths) == [str(paths[0]), str(paths[1]), "other"]
