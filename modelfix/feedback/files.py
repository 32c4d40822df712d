"""Feedback files (methods_posthoc.md §6.1, §6.7): yes/no/maybe verdicts on neurons and on samples.

CRAYON asks a person two kinds of question: is this *neuron* (a channel of the penultimate layer, judged from its
top-activating image patches) relevant, and is this *sample's* saliency map on the right evidence. The answers
travel as small files a person can fill in with a spreadsheet or an editor:

    neurons.csv   layer,neuron,verdict[,note]        missing or blank verdict → keep (released-code semantics)
    samples.csv   sample,verdict[,note]              missing or blank verdict → maybe (cross-entropy only)
    neurons.yaml  {layer: layer4, prune: [0, 17], keep: [609]}       (also the same object as .json)
    samples.yaml  {yes: [...], no: [...], maybe: [...]}  or a list of verdicts in data order
    JSON compat   [true, false, ...] (neurons: len = #channels, true = keep)
                  ["yes", "no", "maybe", ...] (samples: data order)  |  {"cls/001.png": "no", ...}

Verdict aliases (case-insensitive): yes = yes/y/1/true/keep/relevant, no = no/n/0/false/prune/irrelevant,
maybe = maybe/?/skip. Lines starting with `#` are comments; `simulate` records its thresholds there as
`# key: value` (value in JSON), which `read_header_comments` returns.

A sample is named by its path relative to the data root for folder data (`data.info["files"]`), or by its item
index (an integer) for any data. Every user error is one `ModelfixError` naming the file and the row or entry.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .. import safe_json
from ..errors import ModelfixError
from ..atomic import write_text_atomic

ALIASES = {
    **{a: "yes" for a in ("yes", "y", "1", "true", "keep", "relevant")},
    **{a: "no" for a in ("no", "n", "0", "false", "prune", "irrelevant")},
    **{a: "maybe" for a in ("maybe", "?", "skip")},
}
SUFFIXES = (".csv", ".yaml", ".yml", ".json")
_HINT = "verdicts: yes/y/1/true/keep/relevant, no/n/0/false/prune/irrelevant, maybe/?/skip"


def parse_verdict(value, where: str) -> str | None:
    """'yes', 'no' or 'maybe' for any alias; None for a blank cell (not given). `where` names file and row."""
    if value is None:
        return None
    text = str(value).strip().lower()  # YAML gives bools for yes/no and ints for 1/0; str() maps them back
    if not text:
        return None
    if text not in ALIASES:
        raise ModelfixError(f"{where}: unknown verdict '{value}'", hint=_HINT)
    return ALIASES[text]


# ---- the two feedback kinds --------------------------------------------------------------------------------------


@dataclass
class NeuronFeedback:
    """Verdicts on the channels of one layer. A channel without a verdict (or with 'maybe') is kept."""

    layer: str | None
    verdicts: dict[int, str]
    num_channels: int | None = None

    @property
    def prune(self) -> list[int]:
        """The channels judged 'no', sorted."""
        return sorted(j for j, v in self.verdicts.items() if v == "no")

    @property
    def keep(self) -> list[int]:
        """Every other channel: all of range(num_channels) when known, else those with a verdict other than 'no'."""
        pruned = set(self.prune)
        channels = range(self.num_channels) if self.num_channels is not None else sorted(self.verdicts)
        return [j for j in channels if j not in pruned]


def _sample_key(value):
    """An id as the files name it: an int index, or a posix path relative to the data root."""
    if isinstance(value, bool):
        raise ValueError("a sample id cannot be true/false")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    if not text:
        raise ValueError("empty sample id")
    return str(PurePosixPath(text.replace("\\", "/")))


def sample_ids(data) -> list:
    """Each item's id in data order: its path relative to the data root for folder data, else its index."""
    files = data.info.get("files")
    if isinstance(files, list) and len(files) == len(data):
        return [str(PurePosixPath(str(f).replace("\\", "/"))) for f in files]
    return list(range(len(data)))


@dataclass
class SampleFeedback:
    """Verdicts on samples, keyed by sample id (path or index). A sample without a verdict is 'maybe'.

    `length` is set when the file was a list in data order: it must then match the data's size. `source` names the
    file for error messages.
    """

    verdicts: dict
    length: int | None = None
    source: str = "sample feedback"

    def for_data(self, data) -> list[str]:
        """The verdict of every item of `data`, in data order. An id the data does not hold is an error."""
        n = len(data)
        if self.length is not None and self.length != n:
            raise ModelfixError(f"{self.source} lists {self.length} verdicts but the data has {n} samples",
                                hint="a list of verdicts must follow the data order one to one")
        ids = sample_ids(data)
        position = {key: i for i, key in enumerate(ids) if not isinstance(key, int)}
        out: list[str | None] = [None] * n
        for key, verdict in self.verdicts.items():
            i = key if isinstance(key, int) else position.get(key)
            if isinstance(key, int) and not 0 <= key < n:
                i = None
            if i is None:
                example = next((k for k in ids if not isinstance(k, int)), None)
                hint = (f"samples are named by their path relative to the data root, e.g. {example}, or by index"
                        if example is not None else f"samples of this data are named by index 0..{n - 1}")
                raise ModelfixError(f"{self.source} names unknown sample '{key}'", hint=hint)
            if out[i] is not None and out[i] != verdict:
                raise ModelfixError(f"{self.source} gives sample '{ids[i]}' two verdicts ({out[i]} and {verdict}), "
                                    f"by path and by index")
            out[i] = verdict
        return [v or "maybe" for v in out]

    def counts(self, data) -> dict[str, int]:
        """How many items of `data` got each verdict."""
        verdicts = self.for_data(data)
        return {v: verdicts.count(v) for v in ("yes", "no", "maybe")}


# ---- reading -----------------------------------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ModelfixError(f"feedback file {path} must end in .csv, .yaml, .yml or .json")
    return suffix


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ModelfixError(f"cannot read feedback file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ModelfixError(f"feedback file {path} is not UTF-8 text") from None


def _csv_rows(path: Path, columns: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """(line number, cells) of each data row; the header must be `columns` with an optional `note` column."""
    rows = []
    header = None
    reader = csv.reader(io.StringIO(_read_text(path)))
    for cells in reader:
        line = reader.line_num
        if not cells or not "".join(cells).strip() or cells[0].lstrip().startswith("#"):
            continue
        cells = [c.strip() for c in cells]
        if header is None:
            header = [c.lower() for c in cells]
            if header not in (list(columns), list(columns) + ["note"]):
                raise ModelfixError(f"{path} row {line}: header must be '{','.join(columns)}[,note]', "
                                    f"got '{','.join(cells)}'")
            continue
        if len(cells) not in (len(columns), len(header)):
            raise ModelfixError(f"{path} row {line}: expected {len(header)} columns ({','.join(header)}), "
                                f"got {len(cells)}")
        rows.append((line, cells))
    if header is None:
        raise ModelfixError(f"{path} is empty: expected a header '{','.join(columns)}[,note]'")
    return rows


def _load_structured(path: Path, suffix: str):
    text = _read_text(path)
    if suffix == ".json":
        return safe_json.loads(text, str(path))  # depth-bounded: no RecursionError on a hostile file
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelfixError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ModelfixError(f"{path} nests too deeply to be a feedback file") from None


def read_header_comments(path) -> dict:
    """The leading `# key: value` lines of a feedback CSV (value parsed as JSON when it is JSON, else the text)."""
    out = {}
    for line in _read_text(Path(path)).splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].partition(":")
        if sep:
            try:
                out[key.strip()] = json.loads(value)
            except ValueError:
                out[key.strip()] = value.strip()
    return out


class _NeuronVerdicts:
    """Collects neuron verdicts, checking range and conflicts as they come."""

    def __init__(self, path: Path, num_channels: int):
        self.path, self.num_channels, self.verdicts = path, num_channels, {}

    def add(self, neuron, verdict: str | None, where: str) -> None:
        text = str(neuron).strip()
        if isinstance(neuron, bool) or not (isinstance(neuron, int) or text.lstrip("-").isdigit()):
            raise ModelfixError(f"{self.path} {where}: neuron must be an integer, got '{neuron}'")
        neuron = int(text)
        if not 0 <= neuron < self.num_channels:
            raise ModelfixError(f"{self.path} {where} names unknown neuron {neuron} "
                                f"(layer has {self.num_channels} channels)")
        if verdict is None:
            return
        old = self.verdicts.get(neuron)
        if old is not None and old != verdict:
            raise ModelfixError(f"{self.path} {where}: neuron {neuron} is both '{old}' and '{verdict}'")
        self.verdicts[neuron] = verdict


def _check_layer(path: Path, where: str, found, wanted: str | None, seen: str | None) -> str | None:
    """The layer named so far; a different name from `wanted` or an earlier row is an error."""
    if found is None or str(found).strip() == "":
        return seen
    found = str(found).strip()
    for other in (wanted, seen):
        if other is not None and found != other:
            raise ModelfixError(f"{path} {where}: layer '{found}' but the feedback is for layer '{other}'",
                                hint="one neuron file holds verdicts for one layer")
    return found


def declared_layer(path) -> str | None:
    """The layer a neuron file names (CSV `layer` column, YAML/JSON `layer` key), or None: lets a command pick the
    layer from the file before it knows how many channels to check the verdicts against."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix == ".csv":
        names = {cells[0] for _, cells in _csv_rows(path, ("layer", "neuron", "verdict")) if cells[0]}
        return names.pop() if len(names) == 1 else None
    obj = _load_structured(path, suffix)
    return str(obj["layer"]).strip() or None if isinstance(obj, dict) and obj.get("layer") is not None else None


def read_neuron_feedback(path, num_channels: int, layer: str | None = None) -> NeuronFeedback:
    """Verdicts on the `num_channels` channels of `layer` from a .csv, .yaml/.yml or .json file (see module doc)."""
    path = Path(path)
    suffix = _suffix(path)
    collect = _NeuronVerdicts(path, int(num_channels))
    seen = None
    if suffix == ".csv":
        for line, cells in _csv_rows(path, ("layer", "neuron", "verdict")):
            where = f"row {line}"
            seen = _check_layer(path, where, cells[0], layer, seen)
            collect.add(cells[1], parse_verdict(cells[2], f"{path} {where}"), where)
        return NeuronFeedback(layer or seen, collect.verdicts, int(num_channels))

    obj = _load_structured(path, suffix)
    if isinstance(obj, list):
        if len(obj) != num_channels:
            raise ModelfixError(f"{path} lists {len(obj)} neurons but the layer has {num_channels} channels",
                                hint="a list holds one true (keep) / false (prune) per channel")
        for j, value in enumerate(obj):
            if not isinstance(value, bool):
                raise ModelfixError(f"{path} entry {j}: expected true (keep) or false (prune), got {value!r}")
            collect.add(j, "yes" if value else "no", f"entry {j}")
        return NeuronFeedback(layer, collect.verdicts, int(num_channels))
    if not isinstance(obj, dict):
        raise ModelfixError(f"{path} must hold {{layer: ..., prune: [...], keep: [...]}} or a list of true/false")
    unknown = [str(k) for k in obj if k not in ("layer", "prune", "keep")]
    if unknown:
        raise ModelfixError(f"{path}: unknown key '{unknown[0]}'", hint="keys: layer, prune, keep")
    seen = _check_layer(path, "key layer", obj.get("layer"), layer, None)
    for key, verdict in (("prune", "no"), ("keep", "yes")):
        entries = obj.get(key) or []
        if not isinstance(entries, list):
            raise ModelfixError(f"{path}: '{key}' must be a list of neuron numbers")
        for i, neuron in enumerate(entries):
            collect.add(neuron, verdict, f"entry {key}[{i}]")
    return NeuronFeedback(layer or seen, collect.verdicts, int(num_channels))


def read_sample_feedback(path) -> SampleFeedback:
    """Verdicts on samples from a .csv, .yaml/.yml or .json file (see module doc); check them with `for_data`."""
    path = Path(path)
    suffix = _suffix(path)
    verdicts: dict = {}

    def add(key, verdict, where: str) -> None:
        try:
            key = _sample_key(key)
        except ValueError as exc:
            raise ModelfixError(f"{path} {where}: bad sample id {key!r} ({exc})") from None
        if verdict is None:
            return
        if verdicts.get(key, verdict) != verdict:
            raise ModelfixError(f"{path} {where}: sample '{key}' is both '{verdicts[key]}' and '{verdict}'")
        verdicts[key] = verdict

    if suffix == ".csv":
        for line, cells in _csv_rows(path, ("sample", "verdict")):
            where = f"row {line}"
            add(cells[0], parse_verdict(cells[1], f"{path} {where}"), where)
        return SampleFeedback(verdicts, source=str(path))

    obj = _load_structured(path, suffix)
    if isinstance(obj, list):
        for i, value in enumerate(obj):
            add(i, parse_verdict(value, f"{path} entry {i}"), f"entry {i}")
        return SampleFeedback(verdicts, length=len(obj), source=str(path))
    if not isinstance(obj, dict):
        raise ModelfixError(f"{path} must hold {{yes: [...], no: [...], maybe: [...]}}, a list of verdicts in data "
                            f"order, or an object sample → verdict")
    # YAML 1.1 reads the keys yes/no as booleans; accept them as the group names they were meant to be.
    grouped = all(isinstance(k, bool) or (isinstance(k, str) and k.strip().lower() in ("yes", "no", "maybe"))
                  for k in obj)
    for key, value in obj.items():
        if grouped:
            verdict = parse_verdict(key, f"{path} key {key}")
            if not isinstance(value, list):
                raise ModelfixError(f"{path}: '{key}' must be a list of sample ids")
            for i, sample in enumerate(value):
                add(sample, verdict, f"entry {verdict}[{i}]")
        else:
            add(key, parse_verdict(value, f"{path} entry '{key}'"), f"entry '{key}'")
    return SampleFeedback(verdicts, source=str(path))


# ---- writing -----------------------------------------------------------------------------------------------------


def _csv_text(header: list[str], rows, header_comment: dict | None) -> str:
    buffer = io.StringIO()
    for key, value in (header_comment or {}).items():
        buffer.write(f"# {key}: {json.dumps(value)}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_neuron_template(path, layer: str, num_channels: int) -> Path:
    """A blank `neurons.csv` (layer,neuron,verdict,note) with one row per channel; blank verdict = keep."""
    path = Path(path)
    write_text_atomic(path, _csv_text(["layer", "neuron", "verdict", "note"],
                                      ([layer, j, "", ""] for j in range(num_channels)), None))
    return path


def write_sample_template(path, ids, notes=None) -> Path:
    """A blank `samples.csv` (sample,verdict,note) with one row per id; blank verdict = maybe. `notes` (one per id,
    e.g. the overlay file to look at) fill the note column."""
    path = Path(path)
    notes = list(notes) if notes is not None else [""] * len(ids)
    write_text_atomic(path, _csv_text(["sample", "verdict", "note"],
                                      ([i, "", note] for i, note in zip(ids, notes)), None))
    return path


def write_neuron_feedback(path, fb: NeuronFeedback, header_comment: dict | None = None) -> Path:
    """A filled `neurons.csv`: one row per channel (all channels when `fb.num_channels` is known), leading
    `# key: value` comment lines from `header_comment` (e.g. the thresholds `simulate` used)."""
    path = Path(path)
    channels = range(fb.num_channels) if fb.num_channels is not None else sorted(fb.verdicts)
    rows = ([fb.layer or "", j, fb.verdicts.get(j, ""), ""] for j in channels)
    write_text_atomic(path, _csv_text(["layer", "neuron", "verdict", "note"], rows, header_comment))
    return path


def write_sample_feedback(path, fb: SampleFeedback, header_comment: dict | None = None, ids=None) -> Path:
    """A filled `samples.csv`: one row per id of `ids` (default: the ids with a verdict), blank = maybe."""
    path = Path(path)
    ids = list(ids) if ids is not None else list(fb.verdicts)
    rows = ([i, fb.verdicts.get(_sample_key(i), ""), ""] for i in ids)
    write_text_atomic(path, _csv_text(["sample", "verdict", "note"], rows, header_comment))
    return path
