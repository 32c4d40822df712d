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
            "--lr", "0.01", "--json"]  # SGD: Adam's first step is lr·sign(g), which turns rounding noise in a near-zero
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
