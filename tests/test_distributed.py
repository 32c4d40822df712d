"""Commands under torch.distributed (2 CPU processes, gloo) against the same command in one process.

Every expected value is computed by the one-process run. The processes are started either by `torchrun` itself
or, where a test needs a different argument on one rank or each process's exit code, by `launch` below, which
sets exactly the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import run
from modelfix import distributed
from modelfix.errors import ModelfixError

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MODELFIX_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*rank_args: list) -> list[subprocess.CompletedProcess]:
    """`python -m modelfix ARGS` once per entry of `rank_args` (rank r gets rank_args[r]), as torchrun would."""
    port = str(free_port())
    world = str(len(rank_args))
    procs = [subprocess.Popen([sys.executable, "-m", "modelfix", "--no-progress", *map(str, args)],
                              env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=world, LOCAL_WORLD_SIZE=world,
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for r, args in enumerate(rank_args)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def torchrun(*args) -> subprocess.CompletedProcess:
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    return subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "modelfix", "--no-progress",
                           *map(str, args)], env=env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)


def assert_close_weights(a: Path, b: Path, tol: float = 1e-5) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=tol, rtol=0), (key, float((wa[key] - wb[key]).abs().max()))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A small mlp that learned decoy-digits' corner patch (2 epochs: enough to differ from its initialisation)."""
    path = tmp_path_factory.mktemp("dist") / "model.safetensors"
    result = run("train", "--arch", "mlp", "--data", "decoy-digits:train", "--epochs", "2", "--lr", "0.003",
                 "--batch-size", "64", "-o", path)
    assert result.exit_code == 0, result.stderr
    return path


def test_shard_indices_cover_every_item_once():
    for n in (0, 1, 5, 96, 97):
        for world in (1, 2, 3):
            blocks = [distributed.shard_indices(n, r, world) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_one_process_is_the_identity():
    t = torch.tensor([1.0, 2.0])
    assert distributed.world() == (0, 1) and distributed.is_main()
    assert torch.equal(distributed.all_reduce_sum(t), t.double()) and distributed.concat_shards(t) is t
    assert distributed.describe() == {"world_size": 1, "backend": None}


def primitives_worker(rank: int, world: int, port: int) -> None:
    """The collectives on 2 gloo processes, each checked against the same computation in this one process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        assert distributed.world() == (rank, world) and distributed.is_main() == (rank == 0)
        # the agreement: rank 1 fails before any collective, rank 0 learns it at its first one
        if rank == 1:
            assert distributed.report_failure("bad --data", 2) == ("rank 1: bad --data", 2)
        else:
            with pytest.raises(distributed.PeerFailed) as failed:
                distributed.all_reduce_sum(torch.ones(1))
            assert str(failed.value) == "rank 1: bad --data" and failed.value.exit_code == 2
        # a write that fails on rank 0 (the only writer) ends every process alike
        def write():
            raise ModelfixError("cannot write the outputs: disk full")

        with pytest.raises(ModelfixError) as failed:
            distributed.on_main(write)
        assert failed.value.exit_code == 2 and "disk full" in str(failed.value)
        assert str(failed.value).startswith("rank 0: ") == (rank == 1)
        # float64 sums and shards put back together
        x = torch.arange(7, dtype=torch.float32) / 3
        block = distributed.shard_indices(len(x))
        total = distributed.all_reduce_sum(torch.full((2,), 1 / 3) * (rank + 1))
        expected_total = sum(torch.full((2,), 1 / 3).double() * (r + 1) for r in range(world))
        assert total.dtype == torch.float64 and torch.equal(total, expected_total)  # added in float64
        assert torch.equal(distributed.concat_shards(x[block.start:block.stop]), x)
        # gradients of an uneven global batch (5 items: 2 + 3) equal the one-process batch-mean gradient
        torch.manual_seed(0)
        net, data, y = torch.nn.Linear(4, 3), torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        unused = torch.nn.Parameter(torch.zeros(2))
        torch.nn.functional.cross_entropy(net(data), y).backward()
        expected = [p.grad.clone() for p in net.parameters()]
        net.zero_grad(set_to_none=True)
        rows = distributed.shard_indices(5)
        loss = torch.nn.functional.cross_entropy(net(data[rows.start:rows.stop]), y[rows.start:rows.stop])
        loss.backward()
        (summed,) = distributed.average_gradients([*net.parameters(), unused], len(rows) / 5, [len(rows) * 1.0])
        assert summed == 5.0 and unused.grad is None
        for p, e in zip(net.parameters(), expected):
            assert torch.allclose(p.grad, e, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_primitives_on_two_processes_equal_one_process():
    torch.multiprocessing.spawn(primitives_worker, args=(2, free_port()), nprocs=2)


def test_evaluate_under_torchrun_equals_one_process(model, tmp_path):
    args = ["evaluate", model, "--data", "decoy-digits:test", "--poison", "0,0.5,1", "--labels", "correlated,random",
            "--batch-size", "64"]
    one = run(*args, "-o", tmp_path / "one")
    assert one.exit_code == 0, one.stderr
    two = torchrun(*args, "-o", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    expected = json.loads((tmp_path / "one" / "results.json").read_text())
    got = json.loads((tmp_path / "two" / "results.json").read_text())
    assert got["levels"] == expected["levels"] and got["drops"] == expected["drops"]  # exactly
    assert got["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert expected["distributed"] == {"world_size": 1, "backend": None}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left by either rank


@pytest.mark.parametrize("command", [
    ["prune-egem", "--method", "pca-egem", "--scenario", "decoy-digits", "--keep-incorrect",
     "--samples-per-class", "30"],
    ["refit", "--method", "rgem", "--scenario", "decoy-digits", "--keep-incorrect", "--samples-per-class", "30"],
], ids=["pca-egem", "rgem"])
def test_posthoc_under_two_processes_equals_one_process(model, tmp_path, command):
    name, *options = command
    args = [name, model, *options, "--json"]
    one = run(*args, "-o", tmp_path / "one.safetensors")
    assert one.exit_code == 0, one.stderr
    procs = launch(*[[*args, "-o", tmp_path / "two.safetensors"]] * 2)
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr + procs[1].stderr
    assert procs[1].stdout == ""  # one copy of the result, from rank 0
    assert_close_weights(tmp_path / "one.safetensors", tmp_path / "two.safetensors")
    expected, got = json.loads(one.stdout), json.loads(procs[0].stdout)
    assert got["selection"] == expected["selection"]  # the same candidate, with the same validation accuracies
    assert got["distributed"] == {"world_size": 2, "backend": "gloo"}
    card = json.loads((tmp_path / "two.card.json").read_text())
    assert card["history"][-1]["distributed"] == {"world_size": 2, "backend": "gloo"}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """96 decoy-digits training items (with their masks) in a bundle."""
    from modelfix.data import load_data
    from modelfix.data.sources import save_bundle

    path = tmp_path_factory.mktemp("dist-data") / "small.npz"
    save_bundle(load_data("decoy-digits:train").subset(slice(0, 96)), path)
    return path


@pytest.mark.parametrize("method", ["rrr", "r4-cert"])
def test_finetune_two_processes_at_batch_b_equal_one_at_2b(model, small_data, tmp_path, method):
    """96 items, one epoch: one process at batch 64 and two at batch 32 take the same two steps (the second an
    uneven 32-item global batch, 16 per process)."""
    args = ["finetune", model, "--method", method, "--data", small_data, "--epochs", "1", "--optimizer", "sgd",
            "--lr", "0.01", "--lambda", "0.001", "--json"]  # one λ: one run (the default, auto, sweeps three)  # SGD: Adam's first step is lr·sign(g), which turns rounding noise in a near-zero
    # gradient into a full step, so it would compare the sign of noise rather than the gradients
    one = run(*args, "--batch-size", "64", "-o", tmp_path / "one.safetensors")
    assert one.exit_code == 0, one.stderr
    procs = launch(*[[*args, "--batch-size", "32", "-o", tmp_path / "two.safetensors"]] * 2)
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr + procs[1].stderr
    assert_close_weights(tmp_path / "one.safetensors", tmp_path / "two.safetensors")
    before = load_file(str(model))
    after = load_file(str(tmp_path / "two.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it did train
    (expected,), (got,) = json.loads(one.stdout)["sweep"]["runs"], json.loads(procs[0].stdout)["sweep"]["runs"]
    (a,), (b,) = expected["epochs"], got["epochs"]
    assert a.keys() == b.keys() and {"loss", "task", "penalty"} <= a.keys()
    for key in a:  # the epoch's loss and its parts are means over the global batches, as in one process
        assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_same_command_and_world_size_reproduce_the_checkpoint(model, small_data, tmp_path):
    """r4-rand draws random points per process (seed + rank): still the same weights bit for bit on a rerun."""
    args = ["finetune", model, "--method", "r4-rand", "--samples", "2", "--data", small_data, "--epochs", "1",
            "--batch-size", "32"]
    for name in ("a", "b"):
        procs = launch(*[[*args, "-o", tmp_path / f"{name}.safetensors"]] * 2)
        assert [p.returncode for p in procs] == [0, 0], procs[0].stderr + procs[1].stderr
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in load_file(str(model)).items())


def test_bad_input_on_one_rank_ends_every_rank_with_exit_2_and_writes_nothing(model, tmp_path):
    out = tmp_path / "out.safetensors"
    args = ["refit", "--method", "rgem", "--scenario", "decoy-digits", "--keep-incorrect", "-o", out]
    missing = tmp_path / "missing.safetensors"  # e.g. a file that exists on one node only
    procs = launch(["refit", model, *args[1:]], ["refit", missing, *args[1:]])
    assert [p.returncode for p in procs] == [2, 2], procs[0].stderr + procs[1].stderr
    for p in procs:
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: rank 1: "), p.stderr
        assert "missing.safetensors" in lines[0] and "Traceback" not in p.stderr
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())  # nothing, not even staging


def test_ctrl_c_ends_every_process_with_130_and_writes_nothing(tmp_path):
    """SIGINT to every process (what a terminal's Ctrl-C, or torchrun forwarding it, does) once training runs."""
    import signal
    import time

    out = tmp_path / "out.safetensors"
    args = ["train", "--arch", "mlp", "--data", "decoy-digits:train", "--epochs", "500", "-o", out]
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "modelfix", *map(str, args)],
                              env=env(MODELFIX_LOG_FORMAT="plain", RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for r in range(2)]
    try:
        for line in procs[0].stderr:  # rank 0 logs the first epoch: both processes are in the training loop
            if "epoch 1/" in line:
                break
        for p in procs:
            p.send_signal(signal.SIGINT)
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    assert codes == [130, 130]
    rank1 = procs[1].stderr.read()
    assert "interrupted" in rank1 and "epoch" not in rank1  # logs come from rank 0 alone
    assert list(tmp_path.iterdir()) == []
