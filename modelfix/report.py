"""`results.json` (versioned schema) and `report.md`, written atomically into a run folder."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

from . import __version__

SCHEMA = "modelfix.results/v1"


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


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def render_markdown(results: dict) -> str:
    """A report a reviewer can read: the model, the data, one row per poison level, groups and drops."""
    model, data = results["model"], results["data"]
    lines = [
        f"# modelfix {results['command']}",
        "",
        f"- model: `{model.get('path')}` ({model.get('arch')}, {model.get('num_classes')} classes, sha256 `{str(model.get('sha256'))[:16]}`)",
        f"- data: `{data.get('spec')}` ({data.get('n')} items, checksum `{data.get('checksum')}`)",
        f"- artifact: `{results['settings']['artifact']}`, labels {', '.join(results['settings']['labels'])}, seed {results['settings']['seed']}",
        "",
        "| poison | labels | poisoned items | accuracy | macro-group | worst-group (group) |" + (" F1 |" if "f1" in results["levels"][0] else ""),
        "|---:|---|---:|---:|---:|---:|" + ("---:|" if "f1" in results["levels"][0] else ""),
    ]
    for row in results["levels"]:
        f1 = f" {_pct(row['f1'])} |" if "f1" in row else ""
        lines.append(
            f"| {row['level']:g} | {row['labels'] or '–'} | {row['n_poisoned']} | {_pct(row['accuracy'])} | {_pct(row['macro_group_accuracy'])} "
            f"| {_pct(row['worst_group_accuracy'])} ({row['worst_group']}) |{f1}"
        )
    if results["drops"]:
        lines += ["", "Drops (percentage points, first level minus each other level):", ""]
        for drop in results["drops"]:
            lines.append(
                f"- {drop['from']:g} → {drop['to']:g} ({drop['labels']}): accuracy {_pct(drop['accuracy'])}, "
                f"macro-group {_pct(drop['macro_group_accuracy'])}, worst-group {_pct(drop['worst_group_accuracy'])}"
            )
    groups = list(results["levels"][0]["per_group"])
    lines += ["", "Per-group accuracy (%):", "", "| group | " + " | ".join(f"poison {r['level']:g}" + (f" {r['labels']}" if r["labels"] else "") for r in results["levels"]) + " |"]
    lines.append("|---|" + "---:|" * len(results["levels"]))
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(_pct(r["per_group"].get(g)) for r in results["levels"]) + " |")
    reliance = results.get("reliance")
    if reliance:
        lines += ["", f"Artifact reliance ({reliance['method']}, first {reliance['items']} items, explaining the "
                      f"{reliance['target']}; %):", "",
                  "| poison | labels | region | items | relevance mass | top-quartile recall | top-quartile precision | pointing game |",
                  "|---:|---|---|---:|---:|---:|---:|---:|"]
        for row in reliance["levels"]:
            lines.append(f"| {row['level']:g} | {row['labels'] or '–'} | {row.get('region', '')} | {row['n']} | "
                         f"{_pct(row['relevance_mass'])} | {_pct(row['top_quartile_recall'])} | "
                         f"{_pct(row['top_quartile_precision'])} | {_pct(row['pointing_game'])} |")
        definitions = reliance["levels"][0].get("definitions", {}) if reliance["levels"] else {}
        lines += [""] + [f"- {k}: {v}" for k, v in definitions.items()]
    frag = results.get("fragility")
    if frag:
        lines += ["", f"Explanation fragility δ (R4) at ε {frag['eps']:g} over {frag['n']} items ({frag['source']}): "
                      f"masked {frag['masked']:.4g}, core {frag['core']:.4g}, ratio masked/core {frag['ratio']:.4g} "
                      f"(max over items of the largest Cert-R4 bound width on the region; means {frag['masked_mean']:.4g} "
                      f"and {frag['core_mean']:.4g})."]
    lines += ["", "Definitions: " + "; ".join(f"{k}: {v}" for k, v in results["definitions"].items()) + ".", ""]
    return "\n".join(lines)


def json_safe(obj):
    """NaN and infinities become null: results.json must be strict JSON for any consumer."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        umask = os.umask(0)  # mkstemp creates 0600; a report is meant to be shared, so use the usual mode
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_run(out_dir: Path, results: dict) -> list[Path]:
    """results.json, report.md and report.html into `out_dir`."""
    return _write_reports(Path(out_dir), results, render_markdown(results))


def _write_reports(out_dir: Path, doc: dict, markdown: str) -> list[Path]:
    from .report_html import write_html

    json_path, md_path = out_dir / "results.json", out_dir / "report.md"
    write_text_atomic(json_path, json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
    write_text_atomic(md_path, markdown)
    return [json_path, md_path, write_html(out_dir, json_safe(doc), markdown)]


def render_repair_markdown(doc: dict) -> str:
    """The repair report: what was fitted on which samples, the whole selection trace, per-layer settings, folds."""
    trace = doc["trace"]
    samples = trace.get("samples", {})
    key = "alpha" if "alpha" in trace else "lambda"
    lines = [
        f"# modelfix {doc['command']}: {trace['method']}",
        "",
        f"- model: `{doc['model']}` → `{doc['output']}`",
        f"- clean data: `{doc['data'].get('spec')}` ({doc['data'].get('n')} items, checksum `{doc['data'].get('checksum')}`)",
        f"- samples: pool {samples.get('pool')}, correctly predicted {samples.get('correct')}, "
        f"{samples.get('samples_per_class')} per class → fit {samples.get('fit_unique')} unique ({samples.get('fit_size')} "
        f"oversampled), validation {samples.get('val_unique')} unique ({samples.get('val_size')} oversampled)",
        f"- selected {key} = {trace[key]:g} ({trace.get('selected_by')}; slack {trace.get('slack'):g} {trace.get('slack_mode')}); "
        f"validation accuracy {_pct(trace.get('val_orig'))} % → {_pct(trace.get('val_acc'))} %",
        "- time: " + ", ".join(f"{k} {v:.2f} s" for k, v in trace.get("timing", {}).items()),
        "",
    ]
    if trace.get("selection"):
        lines += [f"| {key} | validation accuracy % | within slack |", "|---:|---:|:---:|"]
        for row in trace["selection"]:
            chosen = " **(chosen)**" if row[key] == trace[key] else ""
            lines.append(f"| {row[key]:g}{chosen} | {_pct(row['val_acc'])} | {'yes' if row['passed'] else 'no'} |")
        lines.append("")
    if trace.get("layers"):
        lines += ["| layer | kind | τ | λ | mean factor | units | pruned (< 0.01) |", "|---|---|---:|---:|---:|---:|---:|"]
        for row in trace["layers"]:
            lines.append(f"| {row['name']} | {row.get('kind')} | {row['tau']:.4f} | {row['lambda']:.4g} | "
                         f"{row['mean_factor']:.4f} | {row.get('units')} | {row.get('pruned_units')} |")
        lines.append("")
    fold = doc.get("fold") or {}
    for entry in fold.get("folded", []):
        lines.append(f"- folded `{entry['key']}` ({entry['kind']} at `{entry['target']}`) into {', '.join(f'`{m}`' for m in entry.get('into', []))}")
    for entry in fold.get("kept", []):
        lines.append(f"- kept patch `{entry['key']}` ({entry['kind']} at `{entry['target']}`): {entry['reason']}")
    for warning in trace.get("warnings", []):
        lines.append(f"- warning: {warning}")
    return "\n".join(lines) + "\n"


def render_finetune_markdown(doc: dict) -> str:
    """The fine-tune report: method, data and masks, training settings, and the whole λ sweep with the choice."""
    sweep, data, config = doc["sweep"], doc["data"], doc["config"]
    val = doc.get("val")
    lines = [
        f"# modelfix {doc['command']}: {doc['method']}",
        "",
        f"- method: {doc['method']} ({doc['paper']}); hyper-parameters {doc['hyperparameters'] or 'defaults'}",
        f"- model: `{doc['model']}` → `{doc['output']}`",
        f"- training data: `{data.get('spec')}` ({data.get('n')} items, {data.get('with_mask')} with a mask, "
        f"checksum `{data.get('checksum')}`)" + (f", masks `{data['masks']}`" if data.get("masks") else ""),
        f"- validation data: `{val.get('spec')}` ({val.get('n')} items)" if val else "- validation data: none",
        "- training: " + ", ".join(f"{k} {config[k]}" for k in ("optimizer", "lr", "momentum", "epochs", "batch_size",
                                                                 "weight_decay", "grad_clip", "freeze_bn", "seed",
                                                                 "select") if k in config),
        f"- chosen: λ = {sweep['chosen_lambda']}" + (f" (best validation {sweep['select_by']})" if sweep["select_by"] else ""),
        "",
        "| λ | final loss | task | penalty | validation accuracy % | validation loss | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    num = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for run in sweep["runs"]:
        lam = "–" if run["lambda"] is None else f"{run['lambda']:g}"
        lines.append(f"| {lam}{' **(chosen)**' if run['chosen'] else ''} | {num(run['final_loss'], '.4f')} | "
                     f"{num(run['final_task'], '.4f')} | {num(run['final_penalty'], '.4g')} | "
                     f"{_pct(run.get('val_accuracy'))} | {num(run.get('val_loss'), '.4f')} | {num(run['seconds'], '.1f')} |")
    return "\n".join(lines) + "\n"


def render_crayon_markdown(doc: dict) -> str:
    """The CRAYON-PRUNING report: which channels were pruned on whose verdicts, and the last-layer fine-tune."""
    trace, config = doc["trace"], doc["config"]
    pruned = trace.get("pruned", [])
    shown = ", ".join(map(str, pruned[:40])) + (f", … ({len(pruned)} in all)" if len(pruned) > 40 else "")
    lines = [
        f"# modelfix prune-crayon: {trace['method']}",
        "",
        f"- model: `{doc['model']}` → `{doc['output']}` (a stock checkpoint: the pruned channels are zero columns "
        f"of `{trace.get('linear')}`)",
        f"- feedback: `{config['feedback']}` ({trace['feedback']['no']} no, {trace['feedback']['keep']} keep)",
        f"- layer `{trace.get('layer')}`: pruned {trace.get('n_pruned')} of {trace.get('n_channels')} channels: {shown or 'none'}",
        f"- data: `{doc['data'].get('spec')}` ({doc['data'].get('n')} items)",
        f"- last-layer fine-tune: Adam lr {config['lr']}, weight decay {config['weight_decay']}, {config['epochs']} "
        f"epochs, batch {config['batch_size']}, seed {config['seed']}",
        "",
        "| stage | training loss | training accuracy % |",
        "|---|---:|---:|",
    ]
    for stage, key in (("original", "before"), ("channels zeroed", "pruned")):
        if f"loss_{key}" in trace:
            lines.append(f"| {stage} | {trace[f'loss_{key}']:.4f} | {_pct(trace.get(f'accuracy_{key}'))} |")
    if "final_loss" in trace:
        lines.append(f"| after the fine-tune | {trace['final_loss']:.4f} | {_pct(trace.get('accuracy_after'))} |")
    lines += [""] + [f"- warning: {w}" for w in trace.get("warnings", [])]
    return "\n".join(lines) + "\n"


def write_repair_report(out_dir: Path, doc: dict, render=render_repair_markdown) -> list[Path]:
    """results.json, report.md (rendered by `render`, then the before/after table of `doc`'s assessment) and
    report.html into `out_dir`."""
    from .assessment import accuracy_table

    markdown = render(doc) + "\n" + "\n".join(accuracy_table(doc))
    return _write_reports(Path(out_dir), doc, markdown)


def md_escape(text) -> str:
    """User text safe inside Markdown (and the HTML a Markdown renderer makes of it): HTML special characters as
    entities, Markdown punctuation backslash-escaped, so a class name can neither inject markup nor a link."""
    import html
    import re

    return re.sub(r"([\\`*_{}\[\]()#+!|~>-])", r"\\\1", html.escape(str(text), quote=True))
