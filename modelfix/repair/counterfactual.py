"""Selection that can see a shortcut: candidates scored on a counterfactual validation set.

A model that reads a shortcut is as accurate as a repaired one on clean validation data, so a rule that looks at
clean accuracy alone (the papers' slack rule, best validation accuracy) cannot tell them apart. The counterfactual
set is the validation items with the artifact pasted on half of each class, with a random colour for label-coloured
artifacts (`poison(..., labels="random")`, which also ignores a `target` class); its groups are class × artifact
pasted. A candidate's counterfactual score is its worst-group accuracy there (a shortcut model fails the pasted
items of every class but the artifact's), ties broken by the mean accuracy over the groups (when every candidate
still fails one group entirely, worst-group accuracy is 0 for all of them and says nothing; the mean still sees
which candidate moved the other groups); the rule keeps the candidates whose clean validation accuracy passes the
slack against a reference and picks the best counterfactual score among them (ties: higher clean accuracy, then the
earlier, weaker candidate).

Where the artifact comes from: the caller's (the app layer fills it from `--artifact`, else the model card), else
one cut from the masked training items (`cut_artifact`), else none: then the clean rule and a warning.
"""

from __future__ import annotations

import dataclasses

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from modelfix.data import Artifact, Dataset, ImageSource, batches, parse_artifact, poison, take
from modelfix.data.poison import pasted_batches
from modelfix.errors import ModelfixError
from modelfix.evaluate import metrics, predict, predict_batches
from modelfix.repair.selection import passes

RULES = ("counterfactual", "paper")
SHARE = 0.5  # of each class's validation items carry the pasted artifact
NO_ARTIFACT = "clean (no artifact known)"
NO_ARTIFACT_WARNING = ("no artifact is known (no --artifact, none on the model card, no masks to cut one from): "
                       "the selection fell back to clean validation accuracy, which cannot see a shortcut")


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ModelfixError(f"--select must be one of {', '.join(RULES)}, not '{rule}'")
    return rule


@dataclass(frozen=True, eq=False)
class CutArtifact(Artifact):
    """Pixels cut from one masked training item, pasted at the same place (where `footprint` is set).

    In memory only: its text form names where it came from but does not parse back."""

    kind: ClassVar[str] = "cut"

    pixels: Tensor  # C×h×w
    footprint: Tensor  # h×w bool
    row: int
    col: int
    source: str = ""

    def apply(self, x, colour_labels=None, generator=None):
        n, channels, h, w = x.shape
        ph, pw = self.footprint.shape
        if self.row + ph > h or self.col + pw > w or self.pixels.shape[0] not in (1, channels):
            raise ModelfixError(f"the artifact cut from {self.source} does not fit {channels}×{h}×{w} images")
        mask = torch.zeros(n, 1, h, w, dtype=torch.bool)
        mask[:, 0, self.row:self.row + ph, self.col:self.col + pw] = self.footprint
        patch = torch.zeros(1, channels, h, w, dtype=x.dtype)
        patch[0, :, self.row:self.row + ph, self.col:self.col + pw] = self.pixels.to(x.dtype)
        return torch.where(mask, patch, x), mask.float()

    def __str__(self) -> str:
        ph, pw = self.footprint.shape
        return f"cut:{self.source}@{self.row}:{self.col},{ph}x{pw}"


def _box(mask: Tensor) -> tuple[int, int, int, int] | None:
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    if len(rows) == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def cut_artifact(data: Dataset | ImageSource | None) -> CutArtifact | None:
    """The artifact as the masks show it: the most common bounding box of the masked regions, and the pixels
    inside the mask of the first item with that box, to be pasted at that position. None without masks. A lazy
    source's masks are streamed and only that one item is decoded whole."""
    if data is None or not bool(data.has_mask.any()):
        return None
    masked = torch.nonzero(data.has_mask).flatten()
    if isinstance(data, Dataset):
        found = [(i, _box(data.mask[i, 0] > 0.5)) for i in masked.tolist()]
    else:
        found = [(int(masked[j]), _box(m[0] > 0.5)) for batch in batches(data.subset(masked), 256)
                 for j, m in zip(batch["index"].tolist(), batch["mask"])]
    found = [(i, box) for i, box in found if box is not None]
    if not found:
        return None
    counts = Counter(box for _, box in found)
    box = counts.most_common(1)[0][0]  # ties: the box seen first
    item = next(i for i, b in found if b == box)
    r0, c0, r1, c1 = box
    one = take(data, [item])
    return CutArtifact(pixels=one.x[0, :, r0:r1, c0:c1].clone(), footprint=one.mask[0, 0, r0:r1, c0:c1] > 0.5,
                       row=r0, col=c0, source=f"{data.name}[{item}]")


def find_artifact(artifact, data: Dataset | None) -> Artifact | None:
    """The artifact the counterfactual rule pastes: the given one, else one cut from `data`'s masks, else None."""
    if artifact is not None:
        return parse_artifact(artifact)
    return cut_artifact(data)


def _untargeted(artifact: Artifact) -> Artifact:
    # over every class: the artifact's own target class (EGEM's pixels default to 8) does not apply here
    return dataclasses.replace(artifact, target=None) if getattr(artifact, "target", None) is not None else artifact


def _pasted_half(val, seed: int) -> Tensor:
    """Which items carry the artifact: half (rounded down) of each class, by a seeded permutation."""
    generator = torch.Generator().manual_seed(int(seed))
    chosen = torch.zeros(len(val), dtype=torch.bool)
    for k in range(val.num_classes):
        members = torch.nonzero(val.y == k).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        chosen[members[: int(len(members) * SHARE)]] = True
    return chosen


def _group_names(val) -> list[str]:
    return [f"{name}{suffix}" for name in val.class_names for suffix in ("", " + artifact")]


class StreamedCounterfactual:
    """The counterfactual set of a lazy source, never held whole: labels, groups and names as `counterfactual_set`
    gives them, and `predictions(model)` streams the source, pasting the artifact on each batch after the
    transform (the same draws and pixels as the in-memory set, so the same predictions)."""

    def __init__(self, val: ImageSource, artifact: Artifact, seed: int = 0):
        self.source, self.artifact, self.seed = val, _untargeted(artifact), int(seed)
        chosen = _pasted_half(val, seed)
        self.y, self.group = val.y, 2 * val.y + chosen.long()
        self.class_names, self.group_names = val.class_names, _group_names(val)
        self.name = f"{val.name} (counterfactual)"
        self.info = {"poisoned": chosen, "artifact": str(artifact), "counterfactual": {"share": SHARE, "seed": self.seed}}

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def predictions(self, model: nn.Module, batch_size: int = 256) -> Tensor:
        chosen, hits = self.info["poisoned"], []

        def images():
            for b in pasted_batches(self.source, self.artifact, 1.0, "random", self.seed, batch_size, keep_clean=True):
                hits.append(b["index"])
                yield torch.where(chosen[b["index"], None, None, None], b["pasted"], b["x"])

        out = predict_batches(model, images())
        pred = torch.empty(len(self), dtype=torch.long)
        pred[torch.cat(hits)] = out
        return pred


def counterfactual_set(val: Dataset | ImageSource, artifact: Artifact,
                       seed: int = 0) -> Dataset | StreamedCounterfactual:
    """`val` with `artifact` pasted on half (rounded down) of each class's items, chosen by a seeded permutation;
    label-coloured artifacts get a random colour. Groups: class × pasted (`2·y + pasted`). A lazy source gives a
    `StreamedCounterfactual` (nothing held but labels and groups)."""
    if isinstance(val, ImageSource):
        return StreamedCounterfactual(val, artifact, seed)
    pasted = poison(val, _untargeted(artifact), 1.0, labels="random", seed=seed)
    chosen = _pasted_half(val, seed)
    where = chosen[:, None, None, None]
    names = _group_names(val)
    info = {key: value for key, value in val.info.items() if key not in ("checksum", "poisoned")}
    info.update(poisoned=chosen, artifact=str(artifact), counterfactual={"share": SHARE, "seed": int(seed)})
    return Dataset(x=torch.where(where, pasted.x, val.x), y=val.y, mask=torch.where(where, pasted.mask, val.mask),
                   has_mask=val.has_mask | chosen, group=2 * val.y + chosen.long(), class_names=val.class_names,
                   group_names=names, name=f"{val.name} (counterfactual)", info=info)


class CounterfactualScore(NamedTuple):
    """Worst-group accuracy on the counterfactual set, then the mean over its groups; compared in that order."""

    worst: float
    mean: float


def worst_group(pred: Tensor, cf: Dataset) -> float:
    """Worst-group accuracy of predictions `pred` on the counterfactual set (groups class × pasted)."""
    return metrics(pred, cf)["worst_group_accuracy"]


def group_score(pred: Tensor, cf) -> CounterfactualScore:
    """The counterfactual score of predictions `pred`: worst-group and mean-over-groups accuracy (groups present)."""
    scores = metrics(pred, cf)
    return CounterfactualScore(scores["worst_group_accuracy"], scores["macro_group_accuracy"])


def _predictions(model: nn.Module, cf, batch_size: int) -> Tensor:
    if isinstance(cf, StreamedCounterfactual):
        return cf.predictions(model, batch_size)
    return predict(model, cf.x, batch_size)


def score_model(model: nn.Module, cf, batch_size: int = 256) -> CounterfactualScore:
    """A model's counterfactual score on `cf` (`group_score` of its predictions)."""
    return group_score(_predictions(model, cf, batch_size), cf)


def pasted_accuracy(model: nn.Module, cf: Dataset, batch_size: int = 256) -> float:
    """Accuracy on the counterfactual set's items that carry the pasted artifact (random colour for label-coloured
    kinds): the score left when the validation items all carry the artifact already, so no clean accuracy exists."""
    pasted = cf.info["poisoned"]
    if not bool(pasted.any()):
        return float("nan")
    if isinstance(cf, StreamedCounterfactual):  # one streamed pass over every item, the pasted ones counted
        pred = cf.predictions(model, batch_size)[pasted]
    else:
        pred = predict(model, cf.x[pasted], batch_size)
    return float((pred == cf.y[pasted]).double().mean())


def select_counterfactual(cf_scores: Sequence[float | CounterfactualScore], clean_scores: Sequence[float],
                          reference: float, slack: float, mode: str = "relative") -> int:
    """Index of the best counterfactual score (a `CounterfactualScore`, compared worst group first, or a plain
    float) among the candidates whose clean score passes the slack against `reference`; ties go to the higher
    clean score, then the earlier candidate. 0 when none passes."""
    if not cf_scores or len(cf_scores) != len(clean_scores):
        raise ValueError("one counterfactual and one clean score per candidate are needed")
    keys = [tuple(s) if isinstance(s, tuple) else (s,) for s in cf_scores]
    eligible = [i for i, clean in enumerate(clean_scores) if passes(clean, reference, slack, mode)
                and all(math.isfinite(v) for v in keys[i])]
    if not eligible:
        return 0
    return max(eligible, key=lambda i: (keys[i], clean_scores[i], -i))


def rule_name(slack: float, mode: str = "relative") -> str:
    return f"counterfactual worst-group, clean slack {slack:g} ({mode})"


def holdout(data: Dataset, fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, val): a seeded `fraction` of `data` (at least one item) held out for validation."""
    n = len(data)
    n_val = max(1, round(fraction * n))
    if n - n_val < 1:
        raise ModelfixError("too little training data to hold out a validation slice", hint="pass --val")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return data.subset(order[n_val:].sort().values), data.subset(order[:n_val].sort().values)


def posthoc_counterfactual(inputs, split, select: str) -> tuple[Dataset | None, str | None, list[str]]:
    """(counterfactual set of the refinement split's validation items or None, the rule to record when it is not
    the counterfactual one, warnings) for a post-hoc method run with `select`."""
    if check_rule(select) == "paper":
        return None, None, []
    artifact = find_artifact(inputs.artifact, inputs.data)
    if artifact is None:
        return None, NO_ARTIFACT, [NO_ARTIFACT_WARNING]
    return counterfactual_set(split.val, artifact, inputs.seed), None, []
