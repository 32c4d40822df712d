"""Running under `torchrun` (torch.distributed): who this process is, the few collectives modelfix needs, and the
error contract across processes (docs/distributed.md).

Without a process group (a plain `modelfix …` or a library call) every function here is the one-process identity:
`world()` is (0, 1), reductions return their input, `shard_indices` is every index. So the layers above call these
unconditionally and a single process runs exactly as before.

The error contract. A user error usually shows up while inputs are read and checked, before any collective. If one
process failed there and the others went on into a collective, they would wait forever. So the first collective of
a run is an *agreement*: every process contributes "ok" or its error, and if any failed, every process stops with
that error (`PeerFailed`, exit code of the failure). A process that fails before it reached a collective joins the
agreement from the CLI's error handler (`report_failure`); one that finishes without any collective joins it at
exit (`check_peers`). Outputs are committed only after the agreement and only by rank 0, which tells the others
how its writing went (`on_main`, called by app.outputs.commit), so a failure on any process leaves nothing written
and ends every process.

An error after the agreement that only one process meets (a file that turns out unreadable on one node, a bug) finds
the others inside some collective, where no agreement can reach them. The failing process then *announces* it
(`report_failure`): it leaves its message and exit code in the rendezvous store (the key-value store every process
already shares) and closes its end of the process group; the others' collective fails at once, they read the
message from the store and stop with it (`PeerFailed`, same line, same exit code). Before exiting, every process
counts itself done in the store and the announcer waits for all of them (`finish`), so torchrun, which stops the
survivors of a failed process, finds them exiting with that code already. Writing starts only after a collective
(`on_main`), so rank 0 writes nothing once another process has failed. A process still computing outside any
collective when the announcer has waited long enough is stopped by torchrun (SIGTERM) and ends with the announced
line and code as well (`announced_failure`). Ctrl-C reaches every process of the group;
each exits 130 without any collective (a collective there could hang).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import time

import torch
import torch.distributed as dist

from .errors import ModelfixError

TIMEOUT = datetime.timedelta(minutes=30)
REPORT_WAIT = datetime.timedelta(seconds=20)  # how long an announcer waits for the others, and they for its message
FAILURE_KEY, FAILED_COUNT, DONE_COUNT = "failure", "failed", "done"  # in the store, under modelfix/ATTEMPT/
_state: dict = {"agreed": False, "store": None, "announced": False, "peer_failed": False}


class PeerFailed(ModelfixError):
    """Another process of the run failed; this one stops with its message and exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
        _state["peer_failed"] = True  # this process stops on another's failure: it announces nothing itself


def launched() -> bool:
    """True when torchrun started this process as one of several (WORLD_SIZE > 1)."""
    size = os.environ.get("WORLD_SIZE", "1")
    return size.isdigit() and int(size) > 1 and "RANK" in os.environ


def init() -> None:
    """Join the process group torchrun describes. With CUDA: nccl for CUDA tensors (one GPU per local rank, made
    the current device, so `--device auto`/`cuda` means this process's GPU) and gloo for CPU tensors (a `--device cpu`
    run, object collectives); without CUDA: gloo."""
    if dist.is_initialized() or not launched():
        return
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    # the env:// rendezvous init_process_group would do (same store, same prefix for the group), kept: the store
    # carries a late failure's message, under a prefix of its own per torchrun attempt (a restart reads no stale one)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=TIMEOUT))
    store.set_timeout(TIMEOUT)
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world_size,
                            timeout=TIMEOUT)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    _state.update(agreed=False, store=dist.PrefixStore(f"modelfix/{attempt}", store), announced=False,
                  peer_failed=False)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _state["store"] = None


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def is_main() -> bool:
    return world()[0] == 0


def describe() -> dict:
    """What a card and results.json record about how the run was spread."""
    return {"world_size": world()[1], "backend": str(dist.get_backend()) if active() else None}


def shard_indices(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """This rank's contiguous block of `range(n)`: blocks differ in size by at most one, every index is in exactly
    one block (so per-item metrics count each item once, with no padding duplicates as DistributedSampler adds),
    and concatenating the blocks in rank order gives `range(n)` back."""
    if rank is None or world_size is None:
        rank, world_size = world()
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def batch_block(n: int, batch_size: int) -> range:
    """This rank's contiguous block of `range(n)` made of whole batches of `batch_size` (the batches one process
    would run, dealt out by `shard_indices`): every item is computed in the very batch it has in one process, so
    per-item results are bit for bit the one-process results (a batch's size can change the last bits of a
    convolution). Concatenating the blocks in rank order gives `range(n)` back."""
    batches = shard_indices(-(-n // batch_size))
    return range(min(n, batches.start * batch_size), min(n, batches.stop * batch_size))


# ---- the error agreement ------------------------------------------------------------------------------------------


def _agree(failure: tuple[str, int] | None) -> tuple[str, int] | None:
    """Once per run: every process contributes its failure or None; returns the first failure by rank."""
    _state["agreed"] = True
    rank = dist.get_rank()
    gathered: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(gathered, None if failure is None else (rank, *failure))
    except RuntimeError:  # a process died without reporting (killed, or a parse error before any command ran)
        return ("another process of this distributed run stopped without reporting why", 1)
    for entry in gathered:
        if entry is not None:
            who, message, code = entry
            return (f"rank {who}: {message}", code)
    return None


def check_peers() -> None:
    """The agreement, if this process has not taken part yet: raises PeerFailed when another process failed."""
    if active() and not _state["agreed"]:
        failure = _agree(None)
        if failure is not None:
            raise PeerFailed(*failure)


def report_failure(message: str, code: int) -> tuple[str, int]:
    """From the CLI's error handler of a failing process: join the agreement (if not yet) with this failure; returns
    the message and code every process prints (the first failing rank's). After the agreement, announce it to the
    others (module docstring) and return it with this rank's number; a PeerFailed's own line comes back unchanged."""
    if not active() or _state["peer_failed"] or _state["announced"]:
        return message, code
    if not _state["agreed"]:
        return _agree((message, code)) or (message, code)
    message = f"rank {dist.get_rank()}: {message}"
    _state["announced"] = True
    store = _state["store"]
    if store is not None and store.add(FAILED_COUNT, 1) == 1:  # the first to fail is the one every process names
        store.set(FAILURE_KEY, json.dumps([message, code]))
    dist.destroy_process_group()  # the others' pending collective fails now instead of waiting for us
    # torchrun stops (SIGTERM) the processes left once one exits; the others may exit with this line first, and this
    # process is on its way out with it anyway, so it must not die by the signal instead of with `code`
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return message, code


def _peer_failure() -> PeerFailed:
    """The failure another process announced (its line and code), once a collective broke because it left."""
    store = _state["store"]
    try:
        store.wait([FAILURE_KEY], REPORT_WAIT)
        message, code = json.loads(store.get(FAILURE_KEY))
    except Exception:  # noqa: BLE001 - no store, or nothing announced: the process died (killed, a crash)
        return PeerFailed("another process of this distributed run stopped without reporting why", 1)
    return PeerFailed(message, code)


def announced_failure() -> tuple[str, int] | None:
    """The line and code another process announced, if one did (no waiting): for a process that torchrun stops
    (SIGTERM) while it computes outside any collective after another process failed."""
    store = _state["store"]
    try:
        if store is None or not store.check([FAILURE_KEY]):
            return None
        message, code = json.loads(store.get(FAILURE_KEY))
    except Exception:  # noqa: BLE001 - the store's host is gone: nothing to tell
        return None
    return message, code


def finish() -> None:
    """Last thing before exiting under torchrun: count this process done; a process that announced a failure waits
    (a while) for every other to be done, so none is still running when it exits and torchrun stops the rest. A
    process that stops on another's failure then ignores SIGTERM, as the announcer does from its announcement on:
    each is exiting with the failure's code anyway."""
    store = _state["store"]
    if store is None or not (_state["announced"] or _state["peer_failed"]):
        return
    try:
        store.add(DONE_COUNT, 1)
        if _state["peer_failed"]:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return
        deadline = time.monotonic() + REPORT_WAIT.total_seconds()
        while store.add(DONE_COUNT, 0) < int(os.environ.get("WORLD_SIZE", "1")) and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store's host (rank 0) is gone: nothing left to wait for
        pass


@contextlib.contextmanager
def _collective():
    """Around every collective: a process that left (see `report_failure`) breaks it; stop with its message."""
    check_peers()
    try:
        yield
    except RuntimeError as exc:  # torch's DistBackendError too: "Connection closed by peer"
        raise _peer_failure() from exc


# ---- collectives ------------------------------------------------------------------------------------------------


def barrier() -> None:
    if active():
        with _collective():
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over processes of `tensor`, in float64 (statistics: sums of many float32 terms), on every process."""
    total = tensor.detach().to(torch.float64).clone()
    if active():
        with _collective():
            dist.all_reduce(total)
    return total


def gather_objects(obj) -> list:
    """`obj` of every process, in rank order (small picklable things: partial statistics, shard results)."""
    if not active():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    with _collective():
        dist.all_gather_object(gathered, obj)
    return gathered


def gather_lists(items: list) -> list:
    """The concatenation in rank order of every process's list (per-batch results of a `batch_block`)."""
    return [item for part in gather_objects(list(items)) for item in part]


def concat_shards(shard: torch.Tensor) -> torch.Tensor:
    """The concatenation in rank order of every process's block (see `shard_indices`): the whole result."""
    if not active():
        return shard
    return torch.cat([part.to(shard.device) for part in gather_objects(shard.cpu())])


def on_main(fn) -> None:
    """`fn()` on rank 0 alone (writing the outputs); every process returns once it has finished, and an error it
    raised ends every process alike (the others raise PeerFailed with rank 0's message and exit code)."""
    if not active():
        fn()
        return
    barrier()  # nothing is written once another process has failed
    failure, error = [None], None
    if is_main():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - told to the others, then raised here as it was
            failure, error = [(str(exc), getattr(exc, "exit_code", 1))], exc
    with _collective():
        dist.broadcast_object_list(failure, src=0)
    if error is not None:
        _state["announced"] = True  # the others know (they raise PeerFailed): nothing more to announce
        raise error
    if failure[0] is not None:
        raise PeerFailed(f"rank 0: {failure[0][0]}", failure[0][1])


def broadcast_model(model: torch.nn.Module) -> None:
    """Every process starts from rank 0's parameters and buffers (seeded runs agree anyway; this makes it so)."""
    if not active():
        return
    with torch.no_grad(), _collective():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def average_buffers(model: torch.nn.Module) -> None:
    """Average floating buffers (BatchNorm running statistics) over processes, so every copy is the same model."""
    if not active():
        return
    world_size = dist.get_world_size()
    with torch.no_grad(), _collective():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer.data)
                buffer.data /= world_size


def average_gradients(params: list[torch.nn.Parameter], share: float, values: list[float]) -> list[float]:
    """Make every process's `.grad` the gradient of the GLOBAL batch mean: Σ_ranks share·grad, with share = this
    rank's items / the global batch's items (exact also for an uneven last batch). `values` (e.g. loss·items) are
    summed in the same message; returns their sums.

    Why not DistributedDataParallel: its hooks all-reduce during `backward()`, but the guided objectives take input
    gradients with `create_graph=True` and then back-propagate through them (double backprop), which DDP does not
    support reliably; and it would reduce at every `backward`, where we need one reduction per step. One flat
    all-reduce after `loss.backward()` is simple and exact. A parameter without a gradient on every process keeps
    None (as in one process), so optimisers that skip None gradients behave the same.
    """
    if not active():
        return list(values)
    device = params[0].device if params else torch.device("cpu")
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    present = [float(p.grad is not None) for p in params]
    message = torch.cat([(p.grad.detach().reshape(-1) * share).to(device, dtype) if p.grad is not None
                         else torch.zeros(p.numel(), device=device, dtype=dtype) for p in params]
                        + [torch.tensor(present + list(values), dtype=dtype, device=device)])
    with _collective():
        dist.all_reduce(message)
    start = 0
    for p in params:
        p.grad = message[start:start + p.numel()].view_as(p).to(p.device, p.dtype).clone()
        start += p.numel()
    for p, count in zip(params, message[start:start + len(params)].tolist()):
        if count == 0:  # no process had a gradient for it
            p.grad = None
    return message[start + len(params):].tolist()
