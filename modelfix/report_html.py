"""`report.html`: one self-contained page per run folder (inline CSS, images as data: URLs, no script, no outside
address), so a report can be mailed or archived as a single file and opened anywhere.

The page is built from `results.json` (schema `modelfix.results/v1`; every key but `command` optional):

- `evaluation.{before,after,…}.levels` (repairs) or `levels` (evaluate): the metrics table and a bar chart of
  clean (poison 0) against poisoned accuracy, one series per phase;
- `selection` `{parameter, score_name, rows: [{value, score, chosen, passed?}], percent?}`: the trace as a plot
  and a table (`percent` defaults to true when the score is an accuracy);
- `reliance`: rows per poison level (a list, or evaluate's `{method, items, target, levels: [...]}`), or
  `{before: …, after: …}` of those;
- `heatmaps` `{method, items: [{index, label, input, before, after}]}` with base64 PNGs: a grid, one row per sample;

then the run's report.md converted to HTML, then the raw results.json in a collapsed block. Charts come from
`modelfix.charts` (matplotlib, optional); without it a note stands where a chart would be and the numbers stay in
the tables. Every text from the results or the markdown is HTML-escaped.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import math
import re
from pathlib import Path

from . import __version__
from .charts import accuracy_bars, comparison_bars, has_matplotlib, selection_plot
from .report import _pct, json_safe, write_text_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_PREFIX = "data:image/png;base64,"

NO_CHART = ('Chart not drawn: matplotlib is not installed (pip install "modelfix[report]" adds it); '
            "the numbers are in the table.")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d1d1f;
background:#fff;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:1.5rem}
h1{font-size:1.6rem;margin:0 0 .5rem}
h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
h3{font-size:1.1rem}
table{border-collapse:collapse;margin:.75rem 0;font-size:.9rem}
th,td{border:1px solid #d0d0d0;padding:.25rem .55rem;vertical-align:top}
th{background:#f3f3f3}
.num{text-align:right;font-variant-numeric:tabular-nums}
.center{text-align:center}
code{background:#f3f3f3;padding:0 .2rem;border-radius:3px;font-size:.88em}
pre{background:#f7f7f7;padding:.75rem;overflow:auto;font-size:.8rem}
img.chart{max-width:100%;height:auto;display:block;margin:.5rem 0}
img.map{width:112px;height:auto;image-rendering:pixelated;display:block}
.note{color:#6b4500;background:#fff7e0;padding:.4rem .6rem;border-left:3px solid #e0a800}
.scroll{overflow-x:auto}
.meta{color:#444}
footer{margin-top:2rem;color:#777;font-size:.8rem}
@media print{details{display:none}}
""".strip()


class Markup(str):
    """HTML that is already safe (built here from escaped parts): table cells of this type are not escaped again."""


def _esc(value) -> str:
    return value if isinstance(value, Markup) else html.escape(str(value), quote=True)


# ---- markdown ---------------------------------------------------------------------------------------------------

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_ITEM = re.compile(r"^-\s+(.*)$")
_ALIGN_CELL = re.compile(r"^\s*(:?)-+(:?)\s*$")
_CODE = re.compile(r"(`+)(.+?)\1")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _inline(text: str) -> str:
    """Escaped text with `code` spans and **bold**; code spans are taken first so their content stays literal."""
    parts, pos = [], 0
    for match in _CODE.finditer(text):
        parts.append(_BOLD.sub(r"<strong>\1</strong>", html.escape(text[pos:match.start()])))
        parts.append(f"<code>{html.escape(match.group(2).strip())}</code>")
        pos = match.end()
    parts.append(_BOLD.sub(r"<strong>\1</strong>", html.escape(text[pos:])))
    return "".join(parts)


def _cells(line: str) -> list[str]:
    """The cells of a pipe-table row; `\\|` is a literal pipe inside a cell."""
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", body)]


def _alignments(line: str) -> list[str] | None:
    """`["right", "", "center", …]` for a table's alignment row (`|---:|---|:---:|`), None if it is not one."""
    if "-" not in line or "|" not in line:
        return None
    aligns = []
    for cell in _cells(line):
        match = _ALIGN_CELL.match(cell)
        if match is None:
            return None
        left, right = match.groups()
        aligns.append("center" if left and right else "right" if right else "left" if left else "")
    return aligns


def _starts_block(lines: list[str], i: int) -> bool:
    line = lines[i]
    return bool(_HEADING.match(line) or _ITEM.match(line)
                or (line.lstrip().startswith("|") and i + 1 < len(lines) and _alignments(lines[i + 1])))


def _table_html(header: list[str], aligns: list[str], rows: list[list[str]]) -> str:
    def cell(tag: str, text: str, j: int) -> str:
        align = aligns[j] if j < len(aligns) else ""
        attr = {"right": ' class="num"', "center": ' class="center"', "left": ' style="text-align:left"'}.get(align, "")
        return f"<{tag}{attr}>{_inline(text)}</{tag}>"

    width = len(header)
    out = ['<div class="scroll"><table>', "<thead><tr>" + "".join(cell("th", h, j) for j, h in enumerate(header))
           + "</tr></thead>", "<tbody>"]
    for row in rows:
        row = (row + [""] * width)[:width]  # GFM: missing cells are empty, extra cells are dropped
        out.append("<tr>" + "".join(cell("td", c, j) for j, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def markdown_to_html(text: str, heading_offset: int = 0) -> str:
    """HTML for the markdown subset of modelfix's reports, every text escaped.

    Blocks: ATX headings (`#` … `######`, moved down by `heading_offset` levels, at most h6), `- ` lists (an
    indented line continues the item above), pipe tables with an alignment row (`---:` right, `:---:` centre),
    paragraphs (consecutive lines joined); inline: `code` and **bold**. Anything else is shown as literal text, so
    raw HTML in a report (a class name, a path) can never become markup.
    """
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        heading = _HEADING.match(line)
        if heading:
            level = min(6, len(heading.group(1)) + heading_offset)
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and _alignments(lines[i + 1]) is not None:
            header, aligns = _cells(line), _alignments(lines[i + 1])
            i += 2
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            out.append(_table_html(header, aligns, rows))
        elif _ITEM.match(line):
            items = []
            while i < len(lines) and lines[i].strip():
                item = _ITEM.match(lines[i])
                if item:
                    items.append(item.group(1).strip())
                elif lines[i].startswith((" ", "\t")) and items:
                    items[-1] += " " + lines[i].strip()
                else:
                    break
                i += 1
            out.append("<ul>\n" + "\n".join(f"<li>{_inline(item)}</li>" for item in items) + "\n</ul>")
        else:
            para = [line.strip()]
            i += 1
            while i < len(lines) and lines[i].strip() and not _starts_block(lines, i):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


# ---- pieces of the page -----------------------------------------------------------------------------------------


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _pct_text(value) -> str:
    """report.py's percentage with 2 decimals; "–" for missing, NaN and non-numeric values."""
    return _pct(_number(value))


def _points(before, after) -> str:
    a, b = _number(before), _number(after)
    return "–" if a is None or b is None else f"{100 * (b - a):+.2f}"


def _level_text(row: dict) -> str:
    level = _number(row.get("level"))
    return "–" if level is None else f"{level:g}"


def _category(row: dict) -> str:
    """A chart category: "clean" for poison 0, else "poison LEVEL LABELS"."""
    level = _number(row.get("level"))
    if level == 0:
        return "clean"
    return f"poison {_level_text(row)}" + (f" {row['labels']}" if row.get("labels") else "")


def png_base64(value) -> str | None:
    """The base64 text of a PNG given as base64 (optionally a data: URL) or as bytes; None if it is not a PNG."""
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    elif isinstance(value, str):
        text = value[len(_PNG_PREFIX):] if value.startswith(_PNG_PREFIX) else value
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return None
    else:
        return None
    return base64.b64encode(raw).decode("ascii") if raw.startswith(PNG_MAGIC) else None


def _img(png: bytes | str | None, alt: str, cls: str) -> Markup | None:
    data = png_base64(png)
    if data is None:
        return None
    return Markup(f'<img class="{cls}" src="{_PNG_PREFIX}{data}" alt="{_esc(alt)}">')


def _chart(png: bytes | None, alt: str) -> str:
    return _img(png, alt, "chart") or f'<p class="note">{_esc(NO_CHART)}</p>'


def _table(headers: list[str], rows: list[list], numeric: list[bool],
           groups: list[tuple[str, int]] | None = None) -> str:
    """An HTML table; cells are escaped unless they are `Markup`; numeric columns are right-aligned. `groups`
    adds a header row above: `(label, number of columns spanned)`, e.g. `("accuracy %", 2)` over before/after."""
    def cell(tag: str, value, j: int) -> str:
        attr = ' class="num"' if numeric[j] else ""
        return f"<{tag}{attr}>{_esc(value)}</{tag}>"

    head = ["<tr>" + "".join(cell("th", h, j) for j, h in enumerate(headers)) + "</tr>"]
    if groups:
        spans = [(label, f' colspan="{span}"' if span > 1 else "") for label, span in groups]
        head.insert(0, "<tr>" + "".join(f'<th{attr} class="center">{_esc(label)}</th>' for label, attr in spans)
                    + "</tr>")
    out = ['<div class="scroll"><table>', "<thead>" + "".join(head) + "</thead>", "<tbody>"]
    out += ["<tr>" + "".join(cell("td", v, j) for j, v in enumerate(row)) + "</tr>" for row in rows]
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _phases(block, list_key: str | None) -> dict[str, list[dict]]:
    """`{phase: rows}` from `{"before": {list_key: rows}, …}` (list_key None: `{"before": rows, …}`)."""
    if not isinstance(block, dict):
        return {}
    phases = {}
    for name, value in block.items():
        rows = value.get(list_key) if list_key and isinstance(value, dict) else value
        if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
            phases[str(name)] = rows
    return phases


def _joined(phases: dict[str, list[dict]]) -> list[tuple[dict, dict[str, dict]]]:
    """Rows of several phases matched by (level, labels), in order of first appearance: `[(first row, {phase: row})]`."""
    joined: dict[tuple, tuple[dict, dict]] = {}
    for phase, rows in phases.items():
        for row in rows:
            key = (row.get("level"), row.get("labels"))
            joined.setdefault(key, (row, {}))[1].setdefault(phase, row)
    return list(joined.values())


def _worst(row: dict | None) -> str:
    if row is None:
        return "–"
    group = row.get("worst_group")
    return _pct_text(row.get("worst_group_accuracy")) + ("" if group is None else f" ({group})")


def _levels_of(results: dict) -> dict[str, list[dict]]:
    """The metric rows per phase: `evaluation.<phase>.levels` (repairs), else `{"accuracy": levels}` (evaluate)."""
    phases = _phases(results.get("evaluation"), "levels")
    if phases:
        return phases
    levels = results.get("levels")
    if isinstance(levels, list) and all(isinstance(r, dict) for r in levels):
        return {"accuracy": levels}
    return {}


def _metrics_section(results: dict, charts: bool) -> list[str]:
    phases = _levels_of(results)
    if not any(phases.values()):
        return []
    names = list(phases)
    single = len(names) == 1
    delta = len(names) == 2  # before → after: the change in points
    headers = ["poison", "labels", "poisoned items"]
    groups = None
    if single:
        headers += ["accuracy %", "macro-group %", "worst-group % (group)"]
    else:
        headers += names + (["change (points)"] if delta else []) + names + names
        groups = [("", 3), ("accuracy %", len(names) + delta), ("worst-group % (group)", len(names)),
                  ("macro-group %", len(names))]
    rows = []
    for first, by_phase in _joined(phases):
        n = next((r.get("n_poisoned") for r in by_phase.values() if r.get("n_poisoned") is not None), None)
        row = [_level_text(first), first.get("labels") or "–", "–" if n is None else str(n)]
        get = lambda p, key: (by_phase.get(p) or {}).get(key)  # noqa: E731
        row += [_pct_text(get(p, "accuracy")) for p in names]
        if delta:
            row.append(_points(get(names[0], "accuracy"), get(names[1], "accuracy")))
        if single:
            row.append(_pct_text(get(names[0], "macro_group_accuracy")))
        row += [_worst(by_phase.get(p)) for p in names]
        if not single:
            row += [_pct_text(get(p, "macro_group_accuracy")) for p in names]
        rows.append(row)
    series = {p: {_category(r): _number(r.get("accuracy")) for r in phase_rows} for p, phase_rows in phases.items()}
    title = "clean vs poisoned accuracy" + ("" if single else ": " + " vs ".join(names))
    png = accuracy_bars(series, title) if charts else None
    return ["<section>", "<h2>Accuracy</h2>", _chart(png, title),
            _table(headers, rows, [True, False] + [True] * (len(headers) - 2), groups), "</section>"]


def _selection_section(selection, charts: bool) -> list[str]:
    if not isinstance(selection, dict) or not isinstance(selection.get("rows"), list):
        return []
    rows = [r for r in selection["rows"] if isinstance(r, dict)]
    parameter = str(selection.get("parameter", "value"))
    score_name = str(selection.get("score_name", "score"))
    percent = bool(selection.get("percent", "accuracy" in score_name))
    has_passed = any("passed" in r for r in rows)
    headers = [parameter, f"{score_name} %" if percent else score_name] + (["within slack"] if has_passed else [])
    table_rows = []
    for r in rows:
        value, score = _number(r.get("value")), _number(r.get("score"))
        cells = ["–" if value is None else f"{value:g}", _pct_text(score) if percent else
                 ("–" if score is None else f"{score:.4g}")]
        if r.get("chosen"):
            cells[0] += " (chosen)"
        if has_passed:
            cells.append({True: "yes", False: "no"}.get(r.get("passed"), "–"))
        table_rows.append(cells)
    png = selection_plot(rows, parameter, score_name, percent=percent) if charts else None
    return ["<section>", f"<h2>Selection of {_esc(parameter)}</h2>", _chart(png, f"{score_name} against {parameter}"),
            _table(headers, table_rows, [True] * len(headers)), "</section>"]


RELIANCE_METRICS = (("relevance_mass", "relevance mass"), ("top_quartile_recall", "top-quartile recall"),
                    ("top_quartile_precision", "top-quartile precision"), ("pointing_game", "pointing game"))


def _reliance_rows(block) -> list[dict] | None:
    """The rows of one reliance block: a list of rows, or evaluate's `{method, items, target, levels: [rows]}`."""
    rows = block.get("levels") if isinstance(block, dict) else block
    if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
        return rows
    return None


def _reliance_section(reliance) -> list[str]:
    """`reliance` is one block (a list of rows, or `{…, "levels": rows}`) or `{phase: block}` (before/after)."""
    single = _reliance_rows(reliance)
    if single is not None:
        phases, blocks = {"": single}, [reliance]
    elif isinstance(reliance, dict):
        phases = {str(k): rows for k, v in reliance.items() if (rows := _reliance_rows(v)) is not None}
        blocks = [reliance[k] for k in phases]
    else:
        return []
    if not any(phases.values()):
        return []
    about = next((b for b in blocks if isinstance(b, dict) and b.get("method")), None)
    how = "" if about is None else (
        f" Explanations: {about['method']}" + (f" ({about['composite']})" if about.get("composite") else "")
        + (f", first {about['items']} items" if about.get("items") is not None else "")
        + (f", explaining the {about['target']}" if about.get("target") else "") + ".")
    all_rows = [r for rows in phases.values() for r in rows]
    metrics = [(key, name) for key, name in RELIANCE_METRICS if any(key in r for r in all_rows)]
    has_region = any(r.get("region") for r in all_rows)
    single = len(phases) == 1
    lead = ["poison", "labels"] + (["region"] if has_region else []) + ["items"]
    if single:
        headers, groups = lead + [f"{name} %" for _, name in metrics], None
    else:
        headers = lead + [p for _ in metrics for p in phases]
        groups = [("", len(lead))] + [(f"{name} %", len(phases)) for _, name in metrics]
    rows = []
    for first, by_phase in _joined(phases):
        counts = list(dict.fromkeys(str(r["n"]) for r in by_phase.values() if r.get("n") is not None))
        row = [_level_text(first), first.get("labels") or "–"] + ([first.get("region") or "–"] if has_region else [])
        row.append(" / ".join(counts) or "–")
        row += [_pct_text(by_phase.get(p, {}).get(key)) for key, _ in metrics for p in phases]
        rows.append(row)
    numeric = [True, False] + ([False] if has_region else []) + [True] * (1 + len(metrics) * len(phases))
    return ["<section>", "<h2>Artifact reliance</h2>",
            f"<p>Shares of each explanation on the artifact (higher means more reliance on the shortcut).{_esc(how)}</p>",
            _table(headers, rows, numeric, groups), "</section>"]


HEATMAP_COLUMNS = ("input", "before", "after")


def _heatmap_section(heatmaps) -> list[str]:
    if not isinstance(heatmaps, dict) or not isinstance(heatmaps.get("items"), list):
        return []
    items = [item for item in heatmaps["items"] if isinstance(item, dict)]
    # a report names its own columns (the demo: one per model); a repair has input, before and after
    known = tuple(heatmaps.get("columns") or HEATMAP_COLUMNS)
    columns = [c for c in known if any(c in item for item in items)]
    if not items or not columns:
        return []
    rows = []
    for n, item in enumerate(items):
        index = item.get("index", n)
        facts = [f"#{index}"] + [f"{k}: {v}" for k, v in item.items()
                                 if k not in (*known, "index") and isinstance(v, (str, int, float, bool))]
        caption = Markup("<br>".join(_esc(f) for f in facts))
        rows.append([caption] + [_img(item.get(c), f"sample {index}: {c}", "map") or "–" for c in columns])
    method = heatmaps.get("method")
    what = heatmaps.get("caption") or ("The same samples explained before and after the repair, one row per sample."
                                       if {"before", "after"} <= set(columns)
                                       else "The explained samples, one row per sample.")
    return ["<section>", "<h2>Heatmaps" + (f" ({_esc(method)})" if method else "") + "</h2>", f"<p>{what}</p>",
            _table(["sample", *columns], rows, [False] * (1 + len(columns))), "</section>"]


def _meta(results: dict) -> str:
    items = []
    model = results.get("model")
    if isinstance(model, dict):
        extra = ", ".join(str(model[k]) + (" classes" if k == "num_classes" else "")
                          for k in ("arch", "num_classes") if model.get(k) is not None)
        items.append(f"model <code>{_esc(model.get('path'))}</code>" + (f" ({_esc(extra)})" if extra else ""))
    elif model is not None:
        items.append(f"model <code>{_esc(model)}</code>")
    if results.get("output") is not None:
        items.append(f"output <code>{_esc(results['output'])}</code>")
    data = results.get("data")
    if isinstance(data, dict) and data.get("spec") is not None:
        items.append(f"data <code>{_esc(data['spec'])}</code>" + (f" ({_esc(data['n'])} items)" if data.get("n") else ""))
    if results.get("schema"):
        items.append(f"schema <code>{_esc(results['schema'])}</code>")
    return '<ul class="meta">\n' + "\n".join(f"<li>{item}</li>" for item in items) + "\n</ul>" if items else ""


def _elide_images(obj):
    """A copy for the raw-JSON view with embedded PNGs replaced by a short note (they are shown above)."""
    if isinstance(obj, dict):
        return {k: _elide_images(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_elide_images(v) for v in obj]
    if isinstance(obj, (bytes, bytearray)):
        return f"<{len(obj)} bytes>"
    if isinstance(obj, str) and len(obj) > 64 and png_base64(obj) is not None:
        return f"<PNG image, {len(obj)} base64 characters, shown above>"
    return obj


def _raw(results: dict, name: str) -> str:
    text = json.dumps(json_safe(_elide_images(results)), indent=2, ensure_ascii=False, default=str)
    return f"<details>\n<summary>{_esc(name)}</summary>\n<pre>{_esc(text)}</pre>\n</details>"


def _page(title: str, body: list[str]) -> str:
    footer = (f"<footer>Written by modelfix {_esc(__version__)}. Self-contained: the images are embedded, no script, "
              "no outside resource.</footer>")
    return "\n".join(["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      '<meta name="viewport" content="width=device-width, initial-scale=1">',
                      f"<title>{_esc(title)}</title>", f"<style>\n{_CSS}\n</style>", "</head>", "<body>", "<main>",
                      *[part for part in body if part], footer, "</main>", "</body>", "</html>", ""])


# ---- pages ------------------------------------------------------------------------------------------------------


def render_html(results: dict, markdown: str) -> str:
    """The run's page: title, metrics and accuracy chart, selection trace, reliance, heatmap grid, report.md, raw
    results.json. Sections whose keys are absent are left out; without matplotlib the charts become a note."""
    charts = has_matplotlib()
    method = results.get("method")
    title = f"modelfix {results.get('command', '?')}" + (f": {method}" if method else "")
    body = [f"<h1>{_esc(title)}</h1>", _meta(results)]
    body += _metrics_section(results, charts)
    body += _selection_section(results.get("selection"), charts)
    body += _reliance_section(results.get("reliance"))
    body += _heatmap_section(results.get("heatmaps"))
    if markdown and markdown.strip():
        body += ["<section>", "<h2>report.md</h2>", markdown_to_html(markdown, heading_offset=2), "</section>"]
    body.append(_raw(results, "results.json"))
    return _page(title, body)


def render_comparison_html(comparison: dict, markdown: str) -> str:
    """The merged report of `modelfix report`: one chart of every run's clean, poisoned and worst-group accuracy
    (and relevance mass where measured), then the comparison markdown (its table) and the raw comparison.json."""
    runs = [r for r in comparison.get("runs", []) if isinstance(r, dict)]
    title = f"modelfix report: {len(runs)} run(s) compared"
    series = {}
    with_mass = any(_number(r.get("relevance_mass")) is not None for r in runs)
    for r in runs:
        series[str(r.get("run"))] = {"clean": r.get("clean_accuracy"), "poisoned": r.get("poisoned_accuracy"),
                                     "worst-group": r.get("worst_group_accuracy"),
                                     **({"relevance mass": r.get("relevance_mass")} if with_mass else {})}
    png = comparison_bars(series) if has_matplotlib() and runs else None
    body = [f"<h1>{_esc(title)}</h1>", "<section>", _chart(png, title), "</section>"]
    if markdown and markdown.strip():
        body += ["<section>", "<h2>report.md</h2>", markdown_to_html(markdown, heading_offset=2), "</section>"]
    body.append(_raw(comparison, "comparison.json"))
    return _page(title, body)


def render_demo_html(results: dict, markdown: str) -> str:
    """`modelfix demo`'s page: a chart of every model's clean and poisoned accuracy, the heatmaps of the same
    poisoned test images under every model, then report.md (the table and settings) and the raw results.json."""
    rows = [r for r in results.get("rows", []) if isinstance(r, dict)]
    title = "modelfix demo: one shortcut, every repair"
    series = {str(r.get("name")): {"clean": r.get("clean"), "poisoned": r.get("poisoned")} for r in rows}
    png = comparison_bars(series, "accuracy per model: clean test digits, and with the artifact on every one") \
        if has_matplotlib() and rows else None
    body = [f"<h1>{_esc(title)}</h1>", "<section>", "<h2>Clean vs poisoned accuracy</h2>",
            _chart(png, "clean and poisoned accuracy per model"), "</section>"]
    body += _heatmap_section(results.get("heatmaps"))
    if markdown and markdown.strip():
        body += ["<section>", "<h2>report.md</h2>", markdown_to_html(markdown, heading_offset=2), "</section>"]
    body.append(_raw(results, "results.json"))
    return _page(title, body)


def write_html(out_dir: Path, results: dict, markdown: str) -> Path:
    """`report.html` (render_html) written atomically into `out_dir`."""
    path = Path(out_dir) / "report.html"
    write_text_atomic(path, render_html(results, markdown))
    return path
