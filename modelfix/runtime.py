"""Process-wide runtime settings a command applies once at start: the C allocator policy and torch's threads.

`configure()` (the CLI calls it at command start) tunes glibc's malloc for torch's CPU tensors:

- glibc serves every allocation above `M_MMAP_THRESHOLD` (dynamic, at most 32 MiB) with its own `mmap` and gives it
  back with `munmap` on free. A training step at batch ≥ 256 allocates and frees tensors of tens of MB every
  step, so each step page-faults its whole working set back in (zeroed pages from the kernel).
- `M_MMAP_MAX = 0` serves them from the heap instead, and a large `M_TRIM_THRESHOLD` keeps the freed top of the
  heap mapped, so the next step reuses the same pages. The price: the process keeps its peak heap until it exits
  (its peak, not more; a command's memory peak is the same either way).

Measured ratios are in docs/benchmarks.md ("Performance"). `MODELFIX_NO_MALLOPT=1` leaves the allocator alone;
on a non-glibc platform `configure` does nothing.

`set_threads(n)` sets torch's intra-op threads; the default is 1 (see `default_threads`).
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

# glibc <malloc.h> parameter numbers for mallopt()
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap top mapped for the next step


def configure_allocator() -> bool:
    """Apply the allocator policy of the module docstring; True when glibc accepted it. Idempotent."""
    if os.environ.get("MODELFIX_NO_MALLOPT", "") not in ("", "0") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def default_threads() -> int:
    """1. On the shared 2-core development machine one thread was faster than two for every workload measured
    (docs/benchmarks.md, "Performance"): intra-op threads that wait for a busy core stall the whole op. On a
    dedicated machine with many cores pass `--threads N`."""
    return 1


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to `n` (None: `default_threads()`; 0: every core torch sees); returns it."""
    if n is None:
        n = default_threads()
    n = int(n)
    if n < 0:
        raise ValueError(f"threads must be >= 0, got {n}")
    if n == 0:
        n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def configure(threads: int | None = None) -> dict:
    """Everything a command applies at start: the allocator policy and the thread count. Returns what was set."""
    return {"mallopt": configure_allocator(), "threads": set_threads(threads)}
