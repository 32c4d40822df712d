"""`report.html`: one self-contained page per run folder (inline CSS, images as data: URLs, no script, no outside
address), so a report can be mailed or archived as a single file and opened anywhere.

The page is rendered by jinja2 templates (`modelfix/templates/*.j2`, autoescaping on: every text from a results
document or a markdown file is HTML-escaped) from `results.json` (schema `modelfix.results/v1`; every key but
`command` optional). In page order:

- `warnings` (a list of strings; a repair's `trace.warnings` too): a red box at the top;
- `verdict`: the headline before → after — clean and poisoned accuracy, the gap and the worst class. A document
  may carry it (`summary.verdict`'s shape, optionally with a one-sentence `summary`); otherwise it is computed
  from the metric rows with `summary.verdict`;
- `evaluation.{before,after,…}.levels` (repairs) or `levels` (evaluate): the metrics table (the change is
  after − before, signed) and a bar chart of clean (poison 0) against poisoned accuracy, one series per phase;
- `heatmaps` `{method, cmap?, caption?, columns?, items: [{index, label, explained?, copy?, input, before, after,
  scales?: {column: max |R|}}]}` with base64 PNGs: one card per sample that wraps on narrow screens and in
  print, each with a colour bar (`explain.heatmap.colorbar`), the explained class and the map's scale;
- `reliance`: rows per poison level (a list, or evaluate's `{method, items, target, levels: [...]}`), or
  `{before: …, after: …}` of those, with the chance level (`mask_share`, the artifact's share of the area) beside
  the relevance mass;
- `selection` `{parameter, score_name, rows: [{value, score, chosen, passed?}], percent?}`: the trace as a plot
  and a table (`percent` defaults to true when the score is an accuracy);

then the run's report.md converted to HTML, then the raw results.json in a collapsed block. Charts come from
`modelfix.charts` (matplotlib, optional); without it a note stands where a chart would be and the numbers stay in
the tables.
"""

from __future__ import annotations

import functools
import html
import json
import re
import string
from pathlib import Path

import jinja2
from markupsafe import Markup

from . import __version__
from .atomic import json_safe, write_text_atomic
from .charts import accuracy_bars, comparison_bars, has_matplotlib, selection_plot
from .markup import PNG_MAGIC, number, pct, png_base64, png_data_url, signed_points
from .summary import verdict as compute_verdict

__all__ = ["NO_CHART", "PNG_MAGIC", "markdown_to_html", "png_base64", "render_html", "render_comparison_html",
           "render_demo_html", "write_html"]

NO_CHART = ('Chart not drawn: matplotlib is not installed (pip install "modelfix[report]" adds it); '
            "the numbers are in the table.")


# ---- markdown ---------------------------------------------------------------------------------------------------

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_ITEM = re.compile(r"^-\s+(.*)$")
_ALIGN_CELL = re.compile(r"^\s*(:?)-+(:?)\s*$")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_QUOTE = re.compile(r"^>\s?(.*)$")
_PUNCTUATION = frozenset(string.punctuation)
# A backslash-escaped character is held as a private-use code point while bold is matched, so `\*\*` never
# becomes <strong>; it is put back (escaped) at the end.
_HIDDEN = 0xE000


def _plain(text: str) -> str:
    """Escaped text with **bold**; hidden escaped characters come back as literal (HTML-escaped) text."""
    out = _BOLD.sub(r"<strong>\1</strong>", html.escape(text))
    return re.sub("[\ue000-\ue07f]", lambda m: html.escape(chr(ord(m.group()) - _HIDDEN)), out)


def _inline(text: str) -> str:
    """Escaped text with `code` spans, **bold** and backslash escapes (`\\<` is a literal `<`, as in CommonMark).

    Read left to right: an escaped backtick opens no code span, and a code span's content stays literal
    (backslashes included)."""
    parts, plain, i = [], [], 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in _PUNCTUATION:
            plain.append(chr(_HIDDEN + ord(text[i + 1])))
            i += 2
            continue
        if char == "`":
            fence = re.match(r"`+", text[i:]).group()
            close = re.compile(r"(?<!`)" + fence + r"(?!`)").search(text, i + len(fence))
            if close:
                parts += [_plain("".join(plain)), f"<code>{html.escape(text[i + len(fence):close.start()].strip())}</code>"]
                plain, i = [], close.end()
                continue
            plain.append(fence)
            i += len(fence)
            continue
        plain.append(char)
        i += 1
    parts.append(_plain("".join(plain)))
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
    return bool(_HEADING.match(line) or _ITEM.match(line) or _QUOTE.match(line)
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
    indented line continues the item above), `> ` quotes (the reports' warnings), pipe tables with an alignment
    row (`---:` right, `:---:` centre), paragraphs (consecutive lines joined); inline: `code`, **bold** and
    backslash escapes. Anything else is shown as literal text, so
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
        elif _QUOTE.match(line):
            quoted = []
            while i < len(lines) and _QUOTE.match(lines[i]):
                quoted.append(_QUOTE.match(lines[i]).group(1).strip())
                i += 1
            out.append(f'<blockquote class="warning"><p>{_inline(" ".join(quoted))}</p></blockquote>')
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


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("modelfix", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return env


def _level_text(row: dict) -> str:
    level = number(row.get("level"))
    return "–" if level is None else f"{level:g}"


def _category(row: dict) -> str:
    """A chart category: "clean" for poison 0, else "poison LEVEL LABELS"."""
    if number(row.get("level")) == 0:
        return "clean"
    return f"poison {_level_text(row)}" + (f" {row['labels']}" if row.get("labels") else "")


def _chart(png: bytes | None, alt: str) -> dict:
    return {"src": png_data_url(png), "alt": alt}


def _table(headers: list[str], rows: list[list], numeric: list[bool], groups: list[tuple[str, int]] | None = None) -> dict:
    """A table for the `table` macro; `groups` adds a header row above: `(label, columns spanned)`."""
    return {"headers": headers, "rows": rows, "numeric": numeric, "groups": groups}


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
    return pct(row.get("worst_group_accuracy")) + ("" if group is None else f" ({group})")


def _levels_of(results: dict) -> dict[str, list[dict]]:
    """The metric rows per phase: `evaluation.<phase>.levels` (repairs), else `{"accuracy": levels}` (evaluate)."""
    phases = _phases(results.get("evaluation"), "levels")
    if phases:
        return phases
    levels = results.get("levels")
    if isinstance(levels, list) and all(isinstance(r, dict) for r in levels):
        return {"accuracy": levels}
    return {}


def _metrics_section(results: dict, charts: bool) -> dict | None:
    phases = _levels_of(results)
    if not any(phases.values()):
        return None
    names = list(phases)
    single = len(names) == 1
    delta = len(names) == 2  # before → after: the signed change in points
    headers = ["poison", "labels", "poisoned items"]
    groups = None
    if single:
        headers += ["accuracy %", "macro-group %", "worst-group % (group)"]
    else:
        headers += names + ([f"change ({names[1]} − {names[0]}, points)"] if delta else []) + names + names
        groups = [("", 3), ("accuracy %", len(names) + delta), ("worst-group % (group)", len(names)),
                  ("macro-group %", len(names))]
    rows = []
    for first, by_phase in _joined(phases):
        n = next((r.get("n_poisoned") for r in by_phase.values() if r.get("n_poisoned") is not None), None)
        row = [_level_text(first), first.get("labels") or "–", "–" if n is None else str(n)]
        get = lambda p, key: (by_phase.get(p) or {}).get(key)  # noqa: E731
        row += [pct(get(p, "accuracy")) for p in names]
        if delta:
            row.append(signed_points(get(names[0], "accuracy"), get(names[1], "accuracy")))
        if single:
            row.append(pct(get(names[0], "macro_group_accuracy")))
        row += [_worst(by_phase.get(p)) for p in names]
        if not single:
            row += [pct(get(p, "macro_group_accuracy")) for p in names]
        rows.append(row)
    series = {p: {_category(r): number(r.get("accuracy")) for r in phase_rows} for p, phase_rows in phases.items()}
    title = "clean vs poisoned accuracy" + ("" if single else ": " + " vs ".join(names))
    png = accuracy_bars(series, title) if charts else None
    return {"title": "Accuracy", "intro": None, "chart": _chart(png, title),
            "tables": [_table(headers, rows, [True, False] + [True] * (len(headers) - 2), groups)]}


def _selection_section(selection, charts: bool) -> dict | None:
    if not isinstance(selection, dict) or not isinstance(selection.get("rows"), list):
        return None
    rows = [r for r in selection["rows"] if isinstance(r, dict)]
    parameter = str(selection.get("parameter", "value"))
    score_name = str(selection.get("score_name", "score"))
    percent = bool(selection.get("percent", "accuracy" in score_name))
    has_passed = any("passed" in r for r in rows)
    headers = [parameter, f"{score_name} %" if percent else score_name] + (["within slack"] if has_passed else [])
    table_rows = []
    for r in rows:
        value, score = number(r.get("value")), number(r.get("score"))
        cells = ["–" if value is None else f"{value:g}", pct(score) if percent else
                 ("–" if score is None else f"{score:.4g}")]
        if r.get("chosen"):
            cells[0] += " (chosen)"
        if has_passed:
            cells.append({True: "yes", False: "no"}.get(r.get("passed"), "–"))
        table_rows.append(cells)
    png = selection_plot(rows, parameter, score_name, percent=percent) if charts else None
    return {"title": f"Selection of {parameter}", "intro": None,
            "chart": _chart(png, f"{score_name} against {parameter}"),
            "tables": [_table(headers, table_rows, [True] * len(headers))]}


RELIANCE_METRICS = (("relevance_mass", "relevance mass"), ("top_quartile_recall", "top-quartile recall"),
                    ("top_quartile_precision", "top-quartile precision"), ("pointing_game", "pointing game"))


def _reliance_rows(block) -> list[dict] | None:
    """The rows of one reliance block: a list of rows, or evaluate's `{method, items, target, levels: [rows]}`."""
    rows = block.get("levels") if isinstance(block, dict) else block
    if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
        return rows
    return None


def _reliance_section(reliance) -> dict | None:
    """`reliance` is one block (a list of rows, or `{…, "levels": rows}`) or `{phase: block}` (before/after). The
    chance level (`mask_share`: a map spread evenly puts that share on the artifact) stands beside the relevance
    mass."""
    single = _reliance_rows(reliance)
    if single is not None:
        phases, blocks = {"": single}, [reliance]
    elif isinstance(reliance, dict):
        phases = {str(k): rows for k, v in reliance.items() if (rows := _reliance_rows(v)) is not None}
        blocks = [reliance[k] for k in phases]
    else:
        return None
    if not any(phases.values()):
        return None
    about = next((b for b in blocks if isinstance(b, dict) and b.get("method")), None)
    if about is None and isinstance(reliance, dict) and reliance.get("method"):
        about = reliance  # a repair's {method, items, target, before, after}
    how = "" if about is None else (
        f" Explanations: {about['method']}" + (f" ({about['composite']})" if about.get("composite") else "")
        + (f", first {about['items']} items" if about.get("items") is not None else "")
        + (f", explaining the {about['target']}" if about.get("target") else "") + ".")
    all_rows = [r for rows in phases.values() for r in rows]
    metrics = [(key, name) for key, name in RELIANCE_METRICS if any(key in r for r in all_rows)]
    has_region = any(r.get("region") for r in all_rows)
    has_chance = any(number(r.get("mask_share")) is not None for r in all_rows)
    single = len(phases) == 1
    lead = ["poison", "labels"] + (["region"] if has_region else []) + ["items"]
    headers, groups = list(lead), [("", len(lead))]
    for key, name in metrics:
        span = 1 if single else len(phases)
        headers += [f"{name} %"] if single else list(phases)
        if key == "relevance_mass" and has_chance:
            headers.append("chance %")
            span += 1
        groups.append((f"{name} %" if not single else "", span))
    rows = []
    for first, by_phase in _joined(phases):
        counts = list(dict.fromkeys(str(r["n"]) for r in by_phase.values() if r.get("n") is not None))
        row = [_level_text(first), first.get("labels") or "–"] + ([first.get("region") or "–"] if has_region else [])
        row.append(" / ".join(counts) or "–")
        for key, _ in metrics:
            row += [pct(by_phase.get(p, {}).get(key)) for p in phases]
            if key == "relevance_mass" and has_chance:
                shares = [number(r.get("mask_share")) for r in by_phase.values()]
                row.append(pct(next((s for s in shares if s is not None), None)))
        rows.append(row)
    numeric = [True, False] + ([False] if has_region else []) + [True] * (len(headers) - len(lead) + 1)
    chance = (" Chance is the artifact's share of the image area: a map spread evenly over the image puts that "
              "share of its relevance on the artifact." if has_chance else "")
    return {"title": "Artifact reliance", "chart": None,
            "intro": f"Shares of each explanation on the artifact (higher means more reliance on the shortcut).{how}"
                     f"{chance}",
            "tables": [_table(headers, rows, numeric, None if single else groups)]}


HEATMAP_COLUMNS = ("input", "before", "after")
HIDDEN_FACTS = ("index", "explained", "copy", "label")


def _colorbar(cmap: str) -> dict | None:
    """The colour bar under every heatmap card: the ramp from −max to +max (each map is divided by its own largest
    |value|, given under the map)."""
    from .explain.heatmap import CMAPS, colorbar_png  # numpy and PIL; only pages with heatmaps need them

    if cmap not in CMAPS:
        return None
    return {"src": png_data_url(colorbar_png(cmap)), "low": "−max", "mid": "0", "high": "+max"}


def _heatmap_section(heatmaps) -> dict | None:
    if not isinstance(heatmaps, dict) or not isinstance(heatmaps.get("items"), list):
        return None
    items = [item for item in heatmaps["items"] if isinstance(item, dict)]
    # a report names its own columns (the demo: one per model); a repair has input, before and after
    known = tuple(str(c) for c in heatmaps.get("columns") or HEATMAP_COLUMNS)
    columns = [c for c in known if any(c in item for item in items)]
    if not items or not columns:
        return None
    default_target = heatmaps.get("target")
    samples = []
    for n, item in enumerate(items):
        index = item.get("index", n)
        facts = [f"#{index}" + (f" ({item['copy']})" if item.get("copy") else "")]
        if item.get("label") is not None:
            facts.append(f"true class: {item['label']}")
        explained = item.get("explained", default_target)
        if explained is not None:
            facts.append(f"explained: {explained}")
        facts += [f"{k}: {v}" for k, v in item.items()
                  if k not in (*known, *HIDDEN_FACTS) and isinstance(v, (str, int, float, bool))]
        scales = item.get("scales") if isinstance(item.get("scales"), dict) else {}
        tiles = []
        for c in columns:
            scale = number(scales.get(c))
            tiles.append({"name": c, "src": png_data_url(item.get(c)), "alt": f"sample {index}: {c}",
                          "note": None if scale is None else f"max |R| {scale:.3g}"})
        samples.append({"facts": facts, "tiles": tiles})
    what = heatmaps.get("caption") or (
        "The same samples explained before and after the repair; artifacts outlined in magenta on the input."
        if {"before", "after"} <= set(columns) else "The explained samples, one card per sample.")
    drawn = any(tile["src"] for sample in samples for tile in sample["tiles"])
    return {"method": heatmaps.get("method"), "caption": what, "samples": samples,
            "colorbar": _colorbar(str(heatmaps.get("cmap", "bwr"))) if drawn else None}


def _warnings(results: dict) -> list[str]:
    """Every warning of the document: `warnings`, then a repair's `trace.warnings`, each once."""
    found = []
    for block in (results, results.get("trace")):
        values = block.get("warnings") if isinstance(block, dict) else None
        if isinstance(values, str):
            values = [values]
        found += [str(w) for w in values or [] if w is not None]
    return list(dict.fromkeys(found))


def _verdict(results: dict) -> dict | None:
    """The verdict cards: the document's `verdict` where the caller set one, else `summary.verdict`."""
    given = results.get("verdict")
    v = given if isinstance(given, dict) else compute_verdict(results)
    if isinstance(given, str):  # a repair's verdict line (with its "gap halved / NOT halved / not checked") heads it
        v = {**(v or {"phases": []}), "summary": given}
    if not isinstance(v, dict):
        return None
    phases = [p for p in v.get("phases") or ("before", "after") if isinstance(p, str)]
    cond = v.get("condition") if isinstance(v.get("condition"), dict) else None
    where = "" if cond is None else f" (poison {_level_text(cond)}" + (f" {cond['labels']}" if cond.get("labels") else "") + ")"

    def values(key) -> list:
        block = v.get(key) if isinstance(v.get(key), dict) else {}
        return [block.get(p) for p in phases if p in block]

    def card(what: str, key: str, points: bool = False) -> dict | None:
        vals = values(key)
        if not vals:
            return None
        text = [("–" if number(x) is None else f"{100 * number(x):.2f}" + ("" if points else " %")) for x in vals]
        return {"what": what, "value": " → ".join(text),
                "change": (signed_points(vals[0], vals[-1]) + " points") if len(vals) == 2 else None}

    cards = [card("clean accuracy", "clean_accuracy"), card("poisoned accuracy" + where, "poisoned_accuracy"),
             card("gap: clean − poisoned, points" + where, "gap", points=True)]
    worst = v.get("worst_class") if isinstance(v.get("worst_class"), dict) else {}
    named = [worst[p] for p in phases if isinstance(worst.get(p), dict) and worst[p].get("name") is not None]
    if named:
        cards.append({"what": "worst class" + where, "change": None, "value": " → ".join(
            f"{w['name']}: {pct(w.get('accuracy'))} %" for w in named)})
    cards = [c for c in cards if c is not None]
    summary = v.get("summary") if isinstance(v.get("summary"), str) else None
    return {"cards": cards, "summary": summary} if cards or summary else None


def _meta(results: dict) -> list[tuple[str, str, str | None]]:
    items = []
    model = results.get("model")
    if isinstance(model, dict):
        extra = ", ".join(str(model[k]) + (" classes" if k == "num_classes" else "")
                          for k in ("arch", "num_classes") if model.get(k) is not None)
        items.append(("model", str(model.get("path")), extra or None))
    elif model is not None:
        items.append(("model", str(model), None))
    if results.get("output") is not None:
        items.append(("output", str(results["output"]), None))
    data = results.get("data")
    if isinstance(data, dict) and data.get("spec") is not None:
        items.append(("data", str(data["spec"]), f"{data['n']} items" if data.get("n") else None))
    if results.get("schema"):
        items.append(("schema", str(results["schema"]), None))
    return items


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


def _render(title: str, results: dict, markdown: str, raw_name: str, sections=(), late_sections=(),
            heatmaps=None, verdict=None, warnings=(), meta=()) -> str:
    raw = json.dumps(json_safe(_elide_images(results)), indent=2, ensure_ascii=False, default=str)
    md = Markup(markdown_to_html(markdown, heading_offset=2)) if markdown and markdown.strip() else None
    return _environment().get_template("run.html.j2").render(
        title=title, version=__version__, no_chart=NO_CHART, meta=list(meta), warnings=list(warnings),
        verdict=verdict, sections=[s for s in sections if s], heatmaps=heatmaps,
        late_sections=[s for s in late_sections if s], markdown=md, raw_name=raw_name, raw=raw)


# ---- pages ------------------------------------------------------------------------------------------------------


def render_html(results: dict, markdown: str) -> str:
    """The run's page: title, warnings, verdict, metrics and accuracy chart, heatmap cards, reliance, selection
    trace, report.md, raw results.json. Sections whose keys are absent are left out; without matplotlib the charts
    become a note."""
    charts = has_matplotlib()
    method = results.get("method")
    title = f"modelfix {results.get('command', '?')}" + (f": {method}" if method else "")
    return _render(title, results, markdown, "results.json", meta=_meta(results), warnings=_warnings(results),
                   verdict=_verdict(results), sections=[_metrics_section(results, charts)],
                   heatmaps=_heatmap_section(results.get("heatmaps")),
                   late_sections=[_reliance_section(results.get("reliance")),
                                  _selection_section(results.get("selection"), charts)])


def render_comparison_html(comparison: dict, markdown: str) -> str:
    """The merged report of `modelfix report`: one chart of every run's clean, poisoned and worst-group accuracy
    (and relevance mass where measured) under the headline condition, then the comparison markdown (one table per
    condition) and the raw comparison.json."""
    runs = [r for r in comparison.get("runs", []) if isinstance(r, dict)]
    title = f"modelfix report: {len(runs)} run(s) compared"
    series = {}
    with_mass = any(number(r.get("relevance_mass")) is not None for r in runs)
    for r in runs:
        series[str(r.get("run"))] = {"clean": r.get("clean_accuracy"), "poisoned": r.get("poisoned_accuracy"),
                                     "worst-group": r.get("worst_group_accuracy"),
                                     **({"relevance mass": r.get("relevance_mass")} if with_mass else {})}
    png = comparison_bars(series) if has_matplotlib() and runs else None
    conds = [c for c in comparison.get("conditions") or [] if isinstance(c, dict)]
    intro = None if not conds else ("Poisoned numbers in the chart: poison " + _level_text(conds[0])
                                    + (f" {conds[0]['labels']}" if conds[0].get("labels") else "")
                                    + "; every condition has its own table below.")
    section = {"title": "Clean vs poisoned accuracy per run", "intro": intro, "chart": _chart(png, title), "tables": []}
    return _render(title, comparison, markdown, "comparison.json", sections=[section],
                   warnings=_warnings(comparison))


def render_demo_html(results: dict, markdown: str) -> str:
    """`modelfix demo`'s page: a chart of every model's clean and poisoned accuracy, the heatmaps of the same
    poisoned test images under every model, then report.md (the table and settings) and the raw results.json."""
    rows = [r for r in results.get("rows", []) if isinstance(r, dict)]
    title = "modelfix demo: one shortcut, every repair"
    series = {str(r.get("name")): {"clean": r.get("clean"), "poisoned": r.get("poisoned")} for r in rows}
    png = comparison_bars(series, "accuracy per model: clean test digits, and with the artifact on every one") \
        if has_matplotlib() and rows else None
    section = {"title": "Clean vs poisoned accuracy", "intro": None,
               "chart": _chart(png, "clean and poisoned accuracy per model"), "tables": []}
    return _render(title, results, markdown, "results.json", sections=[section], warnings=_warnings(results),
                   heatmaps=_heatmap_section(results.get("heatmaps")))


def write_html(out_dir: Path, results: dict, markdown: str) -> Path:
    """`report.html` (render_html) written atomically into `out_dir`."""
    path = Path(out_dir) / "report.html"
    write_text_atomic(path, render_html(results, markdown))
    return path
