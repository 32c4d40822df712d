"""`results.json` (versioned schema), `report.md` and `report.html`, written atomically into a run folder.

Every string that comes from the user or from a results document (paths, specs, class and group names, methods,
warnings) is escaped for Markdown (`markup.escape_md`, or `markup.md_code` for paths and specs), so report.md
renders as text in any viewer and report.html (built from it) never gains markup.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import __version__
from .atomic import json_safe, write_text_atomic  # re-exported: the CLI and the demo import them from here
from .markup import escape_md, md_code, pct
from .report_html import write_html

SCHEMA = "modelfix.results/v1"

__all__ = ["SCHEMA", "versions", "results_document", "render_markdown", "write_run", "render_repair_markdown",
           "render_finetune_markdown", "render_crayon_markdown", "write_repair_report", "json_safe",
           "write_text_atomic"]

_pct = pct  # the name the renderers below use
_md = escape_md


def versions() -> dict[str, str]:
    import zennit  # noqa: F401  (only for its version)
    from importlib.metadata import version

    return {"modelfix": __version__, "torch": torch.__version__, "zennit": version("zennit")}


def results_document(command: str, model: dict, data: dict, evaluation: dict) -> dict:
    """The results.json payload: what was run, on what, and every metric."""
    return {
        "schema": SCHEMA,
        "command": command,
        "model": model,
        "data": data,
        "settings": evaluation["settings"],
        "levels": evaluation["levels"],
        "drops": evaluation["drops"],
        "definitions": evaluation["definitions"],
        "timing_s": evaluation["seconds"],
        "versions": versions(),
        "error": None,
    }


def _code(value) -> str:
    """A path, spec or checksum as a literal code span."""
    return md_code(value)


def render_markdown(results: dict) -> str:
    """A report a reviewer can read: the model, the data, one row per poison level, groups and changes."""
    model, data, settings = results["model"], results["data"], results["settings"]
    levels = results["levels"]
    has_f1 = bool(levels) and "f1" in levels[0]
    lines = [
        f"# modelfix {_md(results['command'])}",
        "",
        f"- model: {_code(model.get('path'))} ({_md(model.get('arch'))}, {_md(model.get('num_classes'))} classes, "
        f"sha256 {_code(str(model.get('sha256'))[:16])})",
        f"- data: {_code(data.get('spec'))} ({_md(data.get('n'))} items, checksum {_code(data.get('checksum'))})",
        f"- artifact: {_code(settings['artifact'])}, labels {', '.join(_md(m) for m in settings['labels'])}, "
        f"seed {_md(settings['seed'])}",
        "",
        "| poison | labels | poisoned items | accuracy | macro-group | worst-group (group) |" + (" F1 |" if has_f1 else ""),
        "|---:|---|---:|---:|---:|---:|" + ("---:|" if has_f1 else ""),
    ]
    for row in levels:
        f1 = f" {_pct(row['f1'])} |" if "f1" in row else ""
        lines.append(
            f"| {row['level']:g} | {_md(row['labels'] or '–')} | {row['n_poisoned']} | {_pct(row['accuracy'])} | "
            f"{_pct(row['macro_group_accuracy'])} | {_pct(row['worst_group_accuracy'])} ({_md(row['worst_group'])}) |{f1}"
        )
    if results["drops"]:
        # stored as drops (first level minus the other); shown as a signed change so that a rise reads as a rise
        lines += ["", "Change from the first level to each other level (percentage points, other minus first; "
                      "negative: the artifact costs accuracy):", ""]
        for drop in results["drops"]:
            change = {k: None if drop.get(k) is None else -drop[k]
                      for k in ("accuracy", "macro_group_accuracy", "worst_group_accuracy")}
            lines.append(
                f"- {drop['from']:g} → {drop['to']:g} ({_md(drop['labels'])}): accuracy {_signed(change['accuracy'])}, "
                f"macro-group {_signed(change['macro_group_accuracy'])}, "
                f"worst-group {_signed(change['worst_group_accuracy'])}"
            )
    groups = list(levels[0]["per_group"]) if levels else []
    lines += ["", "Per-group accuracy (%):", "", "| group | " + " | ".join(
        f"poison {r['level']:g}" + (f" {_md(r['labels'])}" if r["labels"] else "") for r in levels) + " |"]
    lines.append("|---|" + "---:|" * len(levels))
    for g in groups:
        lines.append(f"| {_md(g)} | " + " | ".join(_pct(r["per_group"].get(g)) for r in levels) + " |")
    reliance = results.get("reliance")
    if reliance:
        lines += ["", f"Artifact reliance ({_md(reliance['method'])}, first {_md(reliance['items'])} items, explaining "
                      f"the {_md(reliance['target'])}; %; chance: the artifact's share of the image area):", "",
                  "| poison | labels | region | items | relevance mass | chance | top-quartile recall | "
                  "top-quartile precision | pointing game |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in reliance["levels"]:
            lines.append(f"| {row['level']:g} | {_md(row['labels'] or '–')} | {_md(row.get('region', ''))} | "
                         f"{_md(row['n'])} | {_pct(row['relevance_mass'])} | {_pct(row.get('mask_share'))} | "
                         f"{_pct(row['top_quartile_recall'])} | {_pct(row['top_quartile_precision'])} | "
                         f"{_pct(row['pointing_game'])} |")
        definitions = reliance["levels"][0].get("definitions", {}) if reliance["levels"] else {}
        lines += [""] + [f"- {_md(k)}: {_md(v)}" for k, v in definitions.items()]
    frag = results.get("fragility")
    if frag:
        lines += ["", f"Explanation fragility δ (R4) at ε {frag['eps']:g} over {frag['n']} items ({_md(frag['source'])}): "
                      f"masked {frag['masked']:.4g}, core {frag['core']:.4g}, ratio masked/core {frag['ratio']:.4g} "
                      f"(max over items of the largest Cert-R4 bound width on the region; means {frag['masked_mean']:.4g} "
                      f"and {frag['core_mean']:.4g})."]
    lines += ["", "Definitions: " + "; ".join(f"{_md(k)}: {_md(v)}" for k, v in results["definitions"].items()) + ".",
              ""]
    return "\n".join(lines)


def _signed(points) -> str:
    """A change given as a fraction, in percentage points with its sign ("+3.10", "-0.78")."""
    return "–" if points is None else f"{100 * points:+.2f}"


def write_run(out_dir: Path, results: dict) -> list[Path]:
    """results.json, report.md and report.html into `out_dir`."""
    return _write_reports(Path(out_dir), results, render_markdown(results))


def _write_reports(out_dir: Path, doc: dict, markdown: str) -> list[Path]:
    json_path, md_path = out_dir / "results.json", out_dir / "report.md"
    write_text_atomic(json_path, json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
    write_text_atomic(md_path, markdown)
    return [json_path, md_path, write_html(out_dir, json_safe(doc), markdown)]


def render_repair_markdown(doc: dict) -> str:
    """The repair report: what was fitted on which samples, the whole selection trace, per-layer settings, folds."""
    trace = doc["trace"]
    samples = {k: _md(v) for k, v in trace.get("samples", {}).items()}
    key = "alpha" if "alpha" in trace else "lambda"
    lines = [
        f"# modelfix {_md(doc['command'])}: {_md(trace['method'])}",
        "",
        f"- model: {_code(doc['model'])} → {_code(doc['output'])}",
        f"- clean data: {_code(doc['data'].get('spec'))} ({_md(doc['data'].get('n'))} items, checksum "
        f"{_code(doc['data'].get('checksum'))})",
        f"- samples: pool {samples.get('pool')}, correctly predicted {samples.get('correct')}, "
        f"{samples.get('samples_per_class')} per class → fit {samples.get('fit_unique')} unique ({samples.get('fit_size')} "
        f"oversampled), validation {samples.get('val_unique')} unique ({samples.get('val_size')} oversampled)",
        f"- selected {key} = {trace[key]:g} ({_md(trace.get('selected_by'))}; slack {trace.get('slack'):g} "
        f"{_md(trace.get('slack_mode'))}); validation accuracy {_pct(trace.get('val_orig'))} % → "
        f"{_pct(trace.get('val_acc'))} %",
        "- time: " + ", ".join(f"{_md(k)} {v:.2f} s" for k, v in trace.get("timing", {}).items()),
        "",
    ]
    warnings = [*doc.get("warnings", []), *trace.get("warnings", [])]
    if warnings:  # first, where a reader cannot miss them
        lines[2:2] = [f"> **Warning:** {_md(w)}" for w in warnings] + [""]
    if trace.get("selection"):
        lines += [f"selection rule: {_md(trace.get('rule') or 'slack')}", "",
                  f"| {key} | validation accuracy % | within slack | counterfactual worst group % |",
                  "|---:|---:|:---:|---:|"]
        for row in trace["selection"]:
            chosen = " **(chosen)**" if row[key] == trace[key] else ""
            lines.append(f"| {row[key]:g}{chosen} | {_pct(row['val_acc'])} | {'yes' if row['passed'] else 'no'} | "
                         f"{_pct(row.get('cf_worst'))} |")
        lines.append("")
    if trace.get("layers"):
        lines += ["| layer | kind | τ | λ | mean factor | units | pruned (< 0.01) |", "|---|---|---:|---:|---:|---:|---:|"]
        for row in trace["layers"]:
            lines.append(f"| {_md(row['name'])} | {_md(row.get('kind'))} | {row['tau']:.4f} | {row['lambda']:.4g} | "
                         f"{row['mean_factor']:.4f} | {_md(row.get('units'))} | {_md(row.get('pruned_units'))} |")
        lines.append("")
    fold = doc.get("fold") or {}
    for entry in fold.get("folded", []):
        lines.append(f"- folded {_code(entry['key'])} ({_md(entry['kind'])} at {_code(entry['target'])}) into "
                     f"{', '.join(_code(m) for m in entry.get('into', []))}")
    for entry in fold.get("kept", []):
        lines.append(f"- kept patch {_code(entry['key'])} ({_md(entry['kind'])} at {_code(entry['target'])}): "
                     f"{_md(entry['reason'])}")
    return "\n".join(lines) + "\n"


def render_finetune_markdown(doc: dict) -> str:
    """The fine-tune report: method, data and masks, training settings, and the whole λ sweep with the choice."""
    sweep, data, config = doc["sweep"], doc["data"], doc["config"]
    val = doc.get("val")
    hyper = doc["hyperparameters"]
    lines = [
        f"# modelfix {_md(doc['command'])}: {_md(doc['method'])}",
        "",
        f"- method: {_md(doc['method'])} ({_md(doc['paper'])}); hyper-parameters "
        + (_code(hyper) if hyper else "defaults"),
        f"- model: {_code(doc['model'])} → {_code(doc['output'])}",
        f"- training data: {_code(data.get('spec'))} ({_md(data.get('n'))} items, {_md(data.get('with_mask'))} with a "
        f"mask, checksum {_code(data.get('checksum'))})" + (f", masks {_code(data['masks'])}" if data.get("masks") else ""),
        f"- validation data: {_code(val.get('spec'))} ({_md(val.get('n'))} items)" if val else "- validation data: none",
        "- training: " + ", ".join(f"{k} {_md(config[k])}" for k in (
            "optimizer", "lr", "momentum", "epochs", "batch_size", "weight_decay", "grad_clip", "freeze_bn", "seed",
            "select") if k in config),
        f"- chosen: λ = {_md(sweep['chosen_lambda'])}"
        + (f" (by {_md(sweep['select_by'])})" if sweep["select_by"] else ""),
        "",
        "| λ | final loss | task | penalty | validation accuracy % | counterfactual worst group % | validation loss "
        "| seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    num = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for run in sweep["runs"]:
        lam = "–" if run["lambda"] is None else f"{run['lambda']:g}"
        lam += " (diverged)" if run.get("diverged") else ""
        lines.append(f"| {lam}{' **(chosen)**' if run['chosen'] else ''} | {num(run['final_loss'], '.4f')} | "
                     f"{num(run['final_task'], '.4f')} | {num(run['final_penalty'], '.4g')} | "
                     f"{_pct(run.get('val_accuracy'))} | {_pct(run.get('cf_worst_group'))} | "
                     f"{num(run.get('val_loss'), '.4f')} | {num(run['seconds'], '.1f')} |")
    return "\n".join(lines) + "\n"


def render_crayon_markdown(doc: dict) -> str:
    """The CRAYON-PRUNING report: which channels were pruned on whose verdicts, and the last-layer fine-tune."""
    trace, config = doc["trace"], doc["config"]
    pruned = trace.get("pruned", [])
    shown = ", ".join(_md(p) for p in pruned[:40]) + (f", … ({len(pruned)} in all)" if len(pruned) > 40 else "")
    lines = [
        f"# modelfix prune-crayon: {_md(trace['method'])}",
        "",
        f"- model: {_code(doc['model'])} → {_code(doc['output'])} (a stock checkpoint: the pruned channels are zero "
        f"columns of {_code(trace.get('linear'))})",
        f"- feedback: {_code(config['feedback'])} ({_md(trace['feedback']['no'])} no, {_md(trace['feedback']['keep'])} keep)",
        f"- layer {_code(trace.get('layer'))}: pruned {_md(trace.get('n_pruned'))} of {_md(trace.get('n_channels'))} "
        f"channels: {shown or 'none'}",
        f"- data: {_code(doc['data'].get('spec'))} ({_md(doc['data'].get('n'))} items)",
        f"- last-layer fine-tune: Adam lr {_md(config['lr'])}, weight decay {_md(config['weight_decay'])}, "
        f"{_md(config['epochs'])} epochs, batch {_md(config['batch_size'])}, seed {_md(config['seed'])}",
        "",
        "| stage | training loss | training accuracy % |",
        "|---|---:|---:|",
    ]
    for stage, key in (("original", "before"), ("channels zeroed", "pruned")):
        if f"loss_{key}" in trace:
            lines.append(f"| {stage} | {trace[f'loss_{key}']:.4f} | {_pct(trace.get(f'accuracy_{key}'))} |")
    if "final_loss" in trace:
        lines.append(f"| after the fine-tune | {trace['final_loss']:.4f} | {_pct(trace.get('accuracy_after'))} |")
    lines += [""] + [f"> **Warning:** {_md(w)}" for w in trace.get("warnings", [])]
    return "\n".join(lines) + "\n"


def write_repair_report(out_dir: Path, doc: dict, render=render_repair_markdown) -> list[Path]:
    """results.json, report.md (rendered by `render`, then the before/after table of `doc`'s assessment) and
    report.html into `out_dir`."""
    from .assessment import accuracy_table  # assessment imports torch-heavy explainers; only repairs need it

    title, _, body = render(doc).partition("\n")
    head = [f"**Verdict:** {_md(doc['verdict'])}", ""] if doc.get("verdict") else []
    head += [line for line in (f"> **Warning:** {_md(w)}" for w in doc.get("warnings") or []) if line not in body]
    markdown = "\n".join([title, "", *head, body]) + "\n" + "\n".join(accuracy_table(doc))
    return _write_reports(Path(out_dir), doc, markdown)

