"""The one write path. Every output is checked before any work is done, and a command's outputs are committed
together at the end, so a failure (or Ctrl-C, or SIGTERM) at any point leaves the user's files as they were.

Rules (docs/formats.md, "Writing outputs"):
- an output that resolves (realpath) to an input, to an input's sidecar, or into an input folder is refused;
- a file or folder the tool did not write is never replaced without `overwrite` (a modelfix checkpoint, or a report
  folder holding a modelfix results.json, may be replaced: a rerun writes over its own output);
- the parent folder must be writable and every name short enough, checked up front;
- the model (.safetensors + .card.json sidecar) and the report folder are staged under temporary names beside their
  targets and renamed into place only when everything has been written. The renames of one checkpoint's pair happen
  under an exclusive lock on its folder, so two writers racing for one `-o` leave one writer's model with that
  same writer's card (the last to commit wins). Files are written with mode 0666 & ~umask.
- under torchrun only rank 0 writes, and only after every process has agreed that none failed
  (`distributed.check_peers`), so a failure on any process leaves nothing written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from modelfix.atomic import staged_folder
from modelfix.errors import ModelfixError

NAME_MAX = 255
REPORT_FILES = ("results.json", "report.md", "report.html")
# files the command line read before the command itself ran (a --config file or card sidecar): every plan protects
# them like its own inputs, so `train --config m.card.json -o m.safetensors` cannot replace the config it reads
session_inputs: list = []


def sidecar_of(path: Path) -> Path:
    """`x.safetensors` / `x.pt` → `x.card.json` (the checkpoint's readable card)."""
    return path.with_name(path.stem + ".card.json")


def real(path) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _writable_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` (the folder that `mkdir -p` would write into)."""
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            return parent
    return None


def _is_modelfix_checkpoint(path: Path) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return "modelfix.card" in (handle.metadata() or {})
    except Exception:  # not safetensors at all: not ours
        return False


def _is_modelfix_report(folder: Path) -> bool:
    try:
        schema = json.loads((folder / "results.json").read_text(encoding="utf-8")).get("schema", "")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(schema, str) and schema.startswith("modelfix.")


@dataclass
class OutputPlan:
    """The outputs of one command: `model` (a .safetensors path) and/or `folder` (a report or output folder),
    checked against `inputs` (files or folders the command reads) with `check()` before any work."""

    model: Path | None = None
    folder: Path | None = None
    inputs: list = field(default_factory=list)
    files: list = field(default_factory=list)  # plain files (a mask bundle, a feedback CSV)
    overwrite: bool = False
    folder_option: str = "--report"
    model_option: str = "-o"

    def targets(self) -> list[tuple[str, Path]]:
        found = []
        if self.model is not None:
            found += [(self.model_option, Path(self.model)), (self.model_option, sidecar_of(Path(self.model)))]
        if self.folder is not None:
            found.append((self.folder_option, Path(self.folder)))
        return found + [(self.model_option, Path(f)) for f in self.files]

    def check(self) -> "OutputPlan":
        """Refuse, before any work, every output that would destroy an input or a file the tool did not write."""
        if self.model is not None and Path(self.model).suffix != ".safetensors":
            raise ModelfixError(f"{self.model_option} {self.model}: the output must be a .safetensors file")
        protected = []
        for source in [*self.inputs, *session_inputs]:
            if source is None or str(source) == "" or ":" in str(source) and not Path(str(source)).exists():
                continue  # a scenario spec (NAME:SPLIT) is not a file
            path = real(source)
            protected.append((str(source), path, path.is_dir()))
            if path.is_file():
                protected.append((f"{source}'s card", real(sidecar_of(path)), False))
        for option, target in self.targets():
            if len(target.name) > NAME_MAX - 24:  # room for the temporary name's prefix and suffix
                raise ModelfixError(f"{option} {target}: the file name is too long ({len(target.name)} characters)")
            resolved = real(target)
            for name, path, is_dir in protected:
                if resolved == path or (is_dir and _inside(resolved, path)) or _inside(path, resolved):
                    raise ModelfixError(f"refusing to write {option} {target}: it is (or is inside, or holds) the "
                                        f"input {name}", hint="choose an output path outside the inputs")
            ancestor = _writable_ancestor(resolved)
            if ancestor is None or not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
                raise ModelfixError(f"{option} {target}: cannot write into {ancestor or target.parent}",
                                    hint="choose a folder you can write to")
        self._check_existing()
        return self

    def _check_existing(self) -> None:
        if self.overwrite:
            return
        if self.model is not None:
            path = Path(self.model)
            if path.is_dir():
                raise ModelfixError(f"{self.model_option} {path} is a folder", hint="name a .safetensors file")
            if path.exists() and not _is_modelfix_checkpoint(path):
                raise ModelfixError(f"{self.model_option} {path} exists and was not written by modelfix",
                                    hint="choose a new path, or pass --overwrite")
        for path in map(Path, self.files):
            if path.is_dir():
                raise ModelfixError(f"{self.model_option} {path} is a folder", hint="name a file")
            if path.exists():
                raise ModelfixError(f"{self.model_option} {path} exists; modelfix does not replace it",
                                    hint="choose a new path, or pass --overwrite")
        if self.folder is not None:
            folder = Path(self.folder)
            if folder.exists() and not folder.is_dir():
                raise ModelfixError(f"{self.folder_option} {folder} exists and is not a folder",
                                    hint="name a new folder")
            if folder.is_dir() and any(folder.iterdir()) and not _is_modelfix_report(folder):
                raise ModelfixError(f"{self.folder_option} {folder} is not empty and holds no modelfix report",
                                    hint="choose a new folder, or pass --overwrite")


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on `folder` (flock on its descriptor): the commit of one writer at a time."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _share(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def commit(plan: OutputPlan, write_model: Callable[[Path, Path], None] | None = None,
           write_folder: Callable[[Path], None] | None = None) -> None:
    """Write the plan's outputs together: `write_model(tmp, tmp_sidecar)` and `write_folder(staging)` fill
    temporary files; only when both have succeeded are they renamed into place (the pair under the folder lock).
    Under torchrun only rank 0 writes, after the processes agreed that none failed, and a failed write ends every
    process."""
    from modelfix import distributed

    distributed.on_main(lambda: _commit(plan, write_model, write_folder))


def _commit(plan: OutputPlan, write_model, write_folder) -> None:
    tmp_paths: list[Path] = []
    folder_cm = staged_folder(Path(plan.folder)) if plan.folder is not None and write_folder else None
    try:
        if plan.model is not None and write_model is not None:
            path = Path(plan.model)
            path.parent.mkdir(parents=True, exist_ok=True)
            token = secrets.token_hex(4)
            tmp = path.with_name(f".{path.name}.{token}.tmp")
            tmp_side = sidecar_of(path).with_name(f".{sidecar_of(path).name}.{token}.tmp")
            tmp_paths = [tmp, tmp_side]
            write_model(tmp, tmp_side)
            for written in tmp_paths:
                _share(written)
        if folder_cm is not None:
            with folder_cm as staging:
                write_folder(staging)
                for written in staging.rglob("*"):
                    if written.is_file():
                        _share(written)
                _place_model(plan, tmp_paths)  # inside: the folder is renamed right after the model
        else:
            _place_model(plan, tmp_paths)
    except OSError as e:
        raise ModelfixError(f"cannot write the outputs: {e}") from None
    finally:
        for leftover in tmp_paths:
            leftover.unlink(missing_ok=True)


def _place_model(plan: OutputPlan, tmp_paths: list[Path]) -> None:
    if not tmp_paths:
        return
    path = Path(plan.model)
    with folder_lock(path.parent):
        os.replace(tmp_paths[0], path)
        os.replace(tmp_paths[1], sidecar_of(path))


def existing_inputs(paths: Iterable) -> list:
    """The paths among `paths` that name something on disk (scenario specs and None are dropped)."""
    return [p for p in paths if p is not None and Path(str(p)).exists()]
