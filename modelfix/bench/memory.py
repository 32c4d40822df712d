"""Memory grows with the batch, not the dataset: peak RSS of `modelfix evaluate` and of a 1-epoch
`modelfix finetune --method rrr` on a torchvision resnet18 at 224 over a generated folder of JPEGs, at several sizes.

Each command runs as a subprocess (`python -m modelfix ...`); its peak RSS is the largest resident set the process
tree reached, polled from /proc every 0.1 s (the command and any DataLoader workers together), next to the kernel's
own high-water mark of the largest single process (`getrusage(RUSAGE_CHILDREN).ru_maxrss`, read around each run).
The folder of `n` images links item i to image i mod `distinct` of one generated pool (`pool/images/c<k>/<i>.jpg`,
sides in [low, high], a mask per image with a corner square; `distinct` a multiple of the 10 classes, so item i keeps
its class): every size reads the same kind of files and differs only in how many it reads, and the big folder costs
no generation time. Each file is decoded when its batch is built; the page cache is not part of RSS.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10
ARTIFACT = "corner-patch,size=24,num_classes=10"


def make_pool(root, n: int, low: int = 224, high: int = 320, seed: int = 0) -> Path:
    """`root/images/c<k>/<i>.jpg` and `root/masks/c<k>/<i>.png` for i < n (kept if already there): smooth RGB
    images of random sizes in [low, high]² and a mask marking a 24-pixel square in the top-left corner."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(low, high + 1, 2))
        noise_seed = int(rng.integers(2**31))
        image = root / "images" / f"c{i % CLASSES}" / f"{i}.jpg"
        if image.is_file():
            continue
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], axis=2) * 200
        noise = np.random.default_rng(noise_seed).normal(0, 8, (h, w, 3))
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(image, quality=90)
        mask = np.zeros((h, w), np.uint8)
        mask[:24, :24] = 255
        folder = root / "masks" / f"c{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(folder / f"{i}.png")
    return root


def subset_folder(pool: Path, root: Path, n: int, distinct: int) -> Path:
    """`root/{images,masks}/c<k>/<i>` for i < n, symbolic links to pool item i mod `distinct` (no copies)."""
    for kind, suffix in (("images", ".jpg"), ("masks", ".png")):
        for i in range(n):
            link = root / kind / f"c{i % CLASSES}" / f"{i}{suffix}"
            if not link.is_symlink():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to((pool / kind / f"c{i % CLASSES}" / f"{i % distinct}{suffix}").resolve())
    return root


def make_model(path: Path, size: int = 224, arch: str = "resnet18") -> Path:
    """A model of `arch` (resnet18: torchvision's; random weights, 10 classes) at `size` as a modelfix checkpoint."""
    if path.is_file():
        return path
    import torch

    from ..card import InputSpec, ModelCard
    from ..checkpoint import save_model
    from ..zoo import build_model

    torch.manual_seed(0)
    card = ModelCard(arch=arch, num_classes=CLASSES, input=InputSpec(3, size, size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                     class_names=[f"c{k}" for k in range(CLASSES)], artifact=ARTIFACT)
    save_model(build_model(card), card, path)
    return path


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and its descendants (from /proc; 0 once it is gone)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def measure(command: list[str], log: Path, env: dict | None = None, timeout_s: float | None = None) -> dict:
    """Run `command`, polling its tree's RSS; (exit code, seconds, peak tree RSS, peak single-process RSS, whether
    it was stopped after `timeout_s`)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak, trace = [0], []

        def poll():  # the peak, and the tree's RSS every 30 s (flat while the items stream past, or growing)
            while proc.poll() is None:
                rss = _tree_rss(proc.pid)
                peak[0] = max(peak[0], rss)
                if not trace or time.perf_counter() - start >= 30 * len(trace):
                    trace.append((round(time.perf_counter() - start), round(rss / 2**20)))
                time.sleep(0.1)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            code, stopped = proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            proc.terminate()
            code, stopped = proc.wait(), True
        thread.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"exit": code, "stopped": stopped, "seconds": time.perf_counter() - start, "peak_tree_mb": peak[0] / 2**20,
            "rss_trace_s_mb": trace,
            "maxrss_mb": after / 1024 if after > before else None}  # ru_maxrss is KiB; only a new high is this run's


def commands(model: Path, folder: Path, out: Path, batch_size: int, max_steps: int | None,
             workers: int) -> dict[str, list[str]]:
    """The two commands measured at one size."""
    python = [sys.executable, "-m", "modelfix"]
    data = ["--data", str(folder / "images"), "--resize", "shorter", "--workers", str(workers)]
    evaluate = python + ["evaluate", str(model), *data, "--poison", "0,1", "--artifact", ARTIFACT,
                         "--batch-size", str(batch_size)]
    # a small SGD step and λ keep a randomly initialised resnet18 finite for the run (RRR at λ 1 with its default SGD,
    # lr 1e-3, reached NaN within 15 steps): the benchmark measures memory, not a repair
    finetune = python + ["finetune", str(model), "--method", "rrr", *data, "--masks", str(folder / "masks"),
                         "--lambda", "0.001", "--optimizer", "sgd", "--lr", "1e-5", "--epochs", "1",
                         "--batch-size", str(batch_size), "--select-by", "accuracy", "-o", str(out), "--overwrite"]
    if max_steps:
        finetune += ["--max-steps", str(max_steps)]
    return {"evaluate": evaluate, "finetune-rrr": finetune}


def run(root, sizes=(2000, 20000), batch_size: int = 32, max_steps: int | None = 20, workers: int = 0,
        commands_to_run=("evaluate", "finetune-rrr"), size: int = 224, distinct: int = 2000,
        timeout_s: float | None = None, arch: str = "resnet18") -> dict:
    """Peak RSS per command and size, and the ratio largest / smallest size (module docstring). A command still
    running after `timeout_s` is stopped (SIGTERM) and its row says so (`stopped`): its peak is the peak so far."""
    if distinct % CLASSES:
        raise ValueError(f"distinct must be a multiple of {CLASSES}")
    root = Path(root)
    pool = make_pool(root / "pool", min(distinct, max(sizes)))
    model = make_model(root / f"{arch}.safetensors", size, arch)
    rows = []
    for n in sizes:
        folder = subset_folder(pool, root / f"n{n}", n, min(distinct, max(sizes)))
        for name, command in commands(model, folder, root / f"rrr-{arch}-{n}.safetensors", batch_size, max_steps,
                                      workers).items():
            if name not in commands_to_run:
                continue
            result = measure(command, root / f"{name}-{arch}-{n}.log", {**os.environ, "MODELFIX_NO_PROGRESS": "1"}, timeout_s)
            rows.append({"command": name, "n": n, **result, "argv": " ".join(command[2:])})
            print(rows[-1], flush=True)
    ratios = {}
    for name in commands_to_run:
        done = [r for r in rows if r["command"] == name and (r["exit"] == 0 or r["stopped"])]
        if len(done) >= 2:
            ratios[name] = done[-1]["peak_tree_mb"] / done[0]["peak_tree_mb"]
    return {"rows": rows, "ratios": ratios, "batch_size": batch_size, "max_steps": max_steps, "workers": workers}
