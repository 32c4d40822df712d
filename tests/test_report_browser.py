"""The pages in a real browser (headless Chromium, skipped where it is not installed): at 1280 px wide nothing
scrolls sideways, however many models a heatmap grid holds. The reports carry no script, so the check that reads
the page width is injected into a test copy only."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest
import torch

from modelfix.explain.heatmap import colorize, image_png_bytes, png_bytes
from modelfix.report_html import render_demo_html, render_html, render_comparison_html

from test_report_html import repair_results

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")

WIDTH = 1280
PROBE = ("<script>document.body.setAttribute('data-scroll-width', document.documentElement.scrollWidth);"
         "document.body.setAttribute('data-client-width', document.documentElement.clientWidth);</script>")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def widths(tmp_path, name: str, page: str, screenshot: bool = False) -> tuple[int, int]:
    """`(scrollWidth, clientWidth)` of `page` laid out in a 1280×900 window; with `screenshot`, also
    `tmp_path/name.png` to look at."""
    assert "<script" not in page  # the report itself stays script-free
    probe = tmp_path / f"{name}.probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    base = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
            f"--window-size={WIDTH},900", "--run-all-compositor-stages-before-draw", "--virtual-time-budget=3000"]
    dom = subprocess.run(base + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-scroll-width="(\d+)" data-client-width="(\d+)"', dom)
    assert found, dom[-500:]
    if screenshot:
        page_file = tmp_path / f"{name}.html"
        page_file.write_text(page, encoding="utf-8")
        tall = [a if not a.startswith("--window-size") else f"--window-size={WIDTH},2400" for a in base]
        subprocess.run(tall + [f"--screenshot={tmp_path / (name + '.png')}", page_file.as_uri()],
                       capture_output=True, timeout=120)
    return int(found.group(1)), int(found.group(2))


def many_models(n_models: int = 10, n_items: int = 6) -> dict:
    """A demo-like heatmap block: every item under `n_models` models, with outlined inputs."""
    gen = torch.Generator().manual_seed(0)
    items = []
    for i in range(n_items):
        x = torch.rand(1, 28, 28, generator=gen)
        mask = torch.zeros(1, 28, 28)
        mask[:, 1:5, 1:5] = 1
        x[mask.bool()] = 1.0
        item = {"index": i, "label": str(i), "explained": "8", "input": b64(image_png_bytes(x, mask=mask)),
                "scales": {}}
        maps = torch.randn(n_models, 28, 28, generator=gen)
        for j, rgb in enumerate(colorize(maps)):
            item[f"model {j} with a long name"] = b64(png_bytes(rgb))
            item["scales"][f"model {j} with a long name"] = float(maps[j].abs().max())
        items.append(item)
    return {"method": "gradxinput", "target": "class 8", "columns": ["input"] + [f"model {j} with a long name"
                                                                             for j in range(n_models)],
            "items": items}


def test_the_probe_sees_a_page_that_scrolls(tmp_path):
    page = "<!DOCTYPE html><html><body><div style='width:2000px'>wide</div></body></html>"
    scroll, client = widths(tmp_path, "wide", page)
    assert scroll >= 2000 > WIDTH >= client


def test_repair_page_fits_1280(tmp_path):
    results = repair_results()
    results["warnings"] = ["the refinement set has only 3 items of class <7>"]
    scroll, client = widths(tmp_path, "repair", render_html(results, "# report\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"),
                            screenshot=True)
    assert scroll <= client <= WIDTH
    assert (tmp_path / "repair.png").stat().st_size > 10_000


def test_demo_page_with_many_models_fits_1280(tmp_path):
    rows = [{"name": f"model {j} with a long name", "clean": 0.9, "poisoned": 0.1 * j} for j in range(10)]
    results = {"command": "demo", "rows": rows, "heatmaps": many_models()}
    scroll, client = widths(tmp_path, "demo", render_demo_html(results, "# demo\n"), screenshot=True)
    assert scroll <= client <= WIDTH


def test_comparison_page_with_many_runs_fits_1280(tmp_path):
    runs = [{"run": f"runs/a-rather-long-run-folder-name-{j}", "clean_accuracy": 0.9, "poisoned_accuracy": 0.5,
             "worst_group_accuracy": 0.3, "relevance_mass": 0.2} for j in range(12)]
    md = ("# merged\n\n| run | clean % |\n|---|---:|\n" + "".join(f"| {r['run']} | 90.00 |\n" for r in runs)
          + "\n- " + "x" * 400 + "\n")
    scroll, client = widths(tmp_path, "comparison", render_comparison_html({"runs": runs}, md))
    assert scroll <= client <= WIDTH
