"""`compare`: several methods on the same model and inputs, one table (clean, poisoned, gap, worst class clean and
poisoned, seconds), one report, each repaired checkpoint kept. A method that cannot run on the given inputs (no
masks for RRR, no feedback for CRAYON) is listed with the reason instead of ending the run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from modelfix.errors import ModelfixError
from modelfix.repair.registry import get_method
from modelfix.repair.result import MissingInput


@dataclass
class CompareRow:
    method: str
    status: str  # "ok" | "skipped" | "failed"
    reason: str = ""
    clean: float | None = None
    poisoned: float | None = None
    worst_clean: float | None = None
    worst_poisoned: float | None = None
    seconds: float | None = None
    checkpoint: str | None = None
    warnings: list = field(default_factory=list)

    @property
    def gap(self) -> float | None:
        return None if self.clean is None or self.poisoned is None else self.clean - self.poisoned


def _scores(model, data, artifact, seed: int) -> dict:
    from modelfix.evaluate import evaluate

    levels = (0.0, 1.0) if artifact is not None else (0.0,)
    rows = evaluate(model, data, artifact, levels=levels, labels=("random",), seed=seed, progress=False)["levels"]

    def worst(row):
        values = [v for v in row["per_class"].values() if v is not None]
        return min(values) if values else None

    poisoned = rows[1] if len(rows) > 1 else None
    return {"clean": rows[0]["accuracy"], "worst_clean": worst(rows[0]),
            "poisoned": poisoned["accuracy"] if poisoned else None, "worst_poisoned": worst(poisoned) if poisoned else None}


def compare(model, methods, data=None, clean=None, val=None, feedback=None, test=None, artifact=None,
            out_dir: Path | None = None, card=None, seed: int = 0, progress: bool = True, options=None) -> list[CompareRow]:
    """Run every method of `methods` on copies of `model`; score each (and the original) on `test` with and
    without `artifact`. With `out_dir` and `card`, each repaired checkpoint is written there as `<method>.safetensors`.
    `options` maps a method name to its options."""
    from modelfix.app.repair import repair
    from modelfix.checkpoint import save_model
    from modelfix.data import parse_artifact

    artifact = parse_artifact(artifact) if isinstance(artifact, str) else artifact
    rows = [CompareRow("original", "ok", **(_scores(model, test, artifact, seed) if test is not None else {}))]
    for name in methods:
        entry = get_method(name)
        start = time.perf_counter()
        try:
            result = repair(model, data, name, clean=clean, val=val, feedback=feedback, artifact=artifact, seed=seed,
                            progress=progress, **(options or {}).get(name, {}))
        except MissingInput as e:
            rows.append(CompareRow(name, "skipped", str(e)))
            continue
        except ModelfixError as e:  # one method failing (a diverged λ, an unsupported layer) does not end the run
            rows.append(CompareRow(name, "failed", str(e)))
            continue
        row = CompareRow(name, "ok", seconds=time.perf_counter() - start, warnings=list(result.warnings),
                         **(_scores(result.model, test, artifact, seed) if test is not None else {}))
        if out_dir is not None and card is not None:
            path = Path(out_dir) / f"{entry.name}.safetensors"
            save_model(result.model.cpu(), card.with_history({"command": "compare", "method": name,
                                                              "result": result.to_dict()}), path)
            row.checkpoint = str(path)
        rows.append(row)
    return rows
