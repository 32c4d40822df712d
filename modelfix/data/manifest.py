"""CSV/TSV manifests: one row per image with its path, label and optionally its mask path and group.

```
path,label,mask,group
images/a.jpg,cat,masks/a.png,indoor
"dir with, comma/b.png",dog,,outdoor
```

The delimiter follows the suffix (`.csv` comma, `.tsv` tab); fields may be quoted. Relative paths are relative to
the manifest's folder. Column names are configurable; a missing column is one error naming it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

MANIFEST_SUFFIXES = (".csv", ".tsv")


@dataclass(frozen=True)
class Columns:
    """Which columns hold what. `mask` and `group` are optional: used when present, an error only when named
    explicitly (`required_optional`) and absent."""

    path: str = "path"
    label: str = "label"
    mask: str = "mask"
    group: str = "group"
    required_optional: bool = False


@dataclass(frozen=True)
class Row:
    """One manifest row: resolved paths, the label and group as written (names, not indices)."""

    line: int
    path: Path
    label: str
    mask: Path | None
    group: str | None


def read_manifest(path, columns: Columns = Columns()) -> list[Row]:
    """The rows of a `.csv`/`.tsv` manifest; refuses a missing column, an empty path or label, and a manifest
    without rows, each naming the manifest and the line."""
    path = Path(path)
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DataError(f"manifest {path} must end in .csv or .tsv")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark is no column name
            reader = csv.DictReader(f, delimiter=delimiter)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            records = list(reader)
    except FileNotFoundError:
        raise DataError(f"manifest {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from None
    found = ", ".join(header) or "nothing"
    for role, name in (("path", columns.path), ("label", columns.label)):
        if name not in header:
            raise DataError(f"manifest {path} has no column '{name}' (the {role} column; found: {found})",
                            hint=f"rename the column or pass the {role} column's name")
    if columns.required_optional:
        for role, name in (("mask", columns.mask), ("group", columns.group)):
            if name and name not in header:
                raise DataError(f"manifest {path} has no column '{name}' (the {role} column; found: {found})")
    has_mask, has_group = columns.mask in header, columns.group in header
    base = path.parent
    rows = []
    for line, rec in enumerate(records, start=2):  # line 1 is the header
        file = (rec.get(columns.path) or "").strip()
        label = (rec.get(columns.label) or "").strip()
        if not file and not label and all(not (v or "").strip() for v in rec.values() if isinstance(v, str)):
            continue  # a blank line
        if not file:
            raise DataError(f"manifest {path} line {line}: empty '{columns.path}'")
        if not label:
            raise DataError(f"manifest {path} line {line}: empty '{columns.label}'")
        mask = (rec.get(columns.mask) or "").strip() if has_mask else ""
        group = (rec.get(columns.group) or "").strip() if has_group else ""
        rows.append(Row(line, base / file, label, base / mask if mask else None, group or None))
    if not rows:
        raise DataError(f"manifest {path} has no rows")
    return rows
