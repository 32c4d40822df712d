"""Writing output files safely: atomic text and byte writes, and strict-JSON cleaning.

A low module (it imports nothing from modelfix), so every writer — reports, feedback files, heatmap PNGs — can use
it without importing the report layer.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


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


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary sibling of `target` to fill; when the block ends normally it replaces `target` (an old
    `target` is moved aside first and removed after); on any error (KeyboardInterrupt and SIGTERM included) it is
    removed and `target` is left as it was, so a reader never sees a half-written folder. Under torchrun a process
    other than rank 0 fills a throwaway folder (one writer per output)."""
    from . import distributed  # on use: importing this module must not import torch

    distributed.check_peers()
    if not distributed.is_main():
        with tempfile.TemporaryDirectory(prefix="modelfix-rank-") as throwaway:
            yield Path(throwaway)
        return
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    staging = target.with_name(f".{target.name}.tmp-{token}")
    staging.mkdir()
    try:
        share_mode(staging)
        yield staging
        aside = target.with_name(f".{target.name}.old-{token}")
        if target.exists():
            os.replace(target, aside)
        try:
            os.replace(staging, target)
        except BaseException:
            if aside.exists():
                os.replace(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
