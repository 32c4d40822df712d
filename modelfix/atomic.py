"""Writing output files safely: atomic text and byte writes, and strict-JSON cleaning.

A low module (it imports nothing from modelfix), so every writer — reports, feedback files, heatmap PNGs — can use
it without importing the report layer.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path


def json_safe(obj):
    """NaN and infinities become null: results.json must be strict JSON for any consumer."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def share_mode(path: str | os.PathLike) -> None:
    """The mode every output gets: 0666 & ~umask for a file, 0777 & ~umask for a folder (what `open` and `mkdir`
    give); mkstemp and mkdtemp create 0600 / 0700, which would hide a shared run's outputs from its group."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        share_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`text` as UTF-8, written atomically (write_bytes_atomic)."""
    return write_bytes_atomic(path, text.encode("utf-8"))
