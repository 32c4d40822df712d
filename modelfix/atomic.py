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


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        umask = os.umask(0)  # mkstemp creates 0600; an output is meant to be shared, so use the usual mode
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`text` as UTF-8, written atomically (write_bytes_atomic)."""
    return write_bytes_atomic(path, text.encode("utf-8"))
