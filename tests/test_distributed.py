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


def launch(*rank_args: list, program: tuple = ("-m", "modelfix", "--no-progress")) -> list[subprocess.CompletedProcess]:
    """`python -m modelfix ARGS` once per entry of `rank_args` (rank r gets rank_args[r]), as torchrun would."""
    port = str(free_port())
    world = str(len(rank_args))
    procs = [subprocess.Popen([sys.executable, *program, *map(str, args)],
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
            "--batch-size", "64", "--explain", "gradient", "--explain-items", "150", "--fragility", "0.05"]
    one = run(*args, "-o", tmp_path / "one")
    assert one.exit_code == 0, one.stderr
    two = torchrun(*args, "-o", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    expected = json.loads((tmp_path / "one" / "results.json").read_text())
    got = json.loads((tmp_path / "two" / "results.json").read_text())
    assert got["levels"] == expected["levels"] and got["drops"] == expected["drops"]  # exactly
    assert got["reliance"] == expected["reliance"] and got["fragility"] == expected["fragility"]  # --explain, --fragility
    assert [row["n"] for row in got["reliance"]["levels"]][0] == 150 and got["fragility"]["n"] == 539
    assert got["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert expected["distributed"] == {"world_size": 1, "backend": None}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left by either rank


@pytest.mark.parametrize("command", [
    ["prune-egem", "--method", "pca-egem", "--scenario", "decoy-digits", "--keep-incorrect",
     "--samples-per-class", "30"],
    ["refit", "--method", "rgem", "--scenario", "decoy-digits", "--keep-incorrect", "--samples-per-class", "30"],
    ["prune-egem", "--method", "egem-full", "--scenario", "decoy-digits", "--keep-incorrect",
     "--samples-per-class", "30"],
], ids=["pca-egem", "rgem", "egem-full"])
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


# `modelfix ARGS` where the second prediction pass of rank 1 meets a bad input: an error after the agreement (the
# first pass's collective), met by one process only, while the other waits in the second pass's collective, or
# first computes for COMPUTE_SECONDS outside any collective (longer than the failing process waits for it).
LATE_FAILURE = """
import os, sys, time
import modelfix.evaluate as evaluation
from modelfix.errors import DataError
original, calls = evaluation.predict, [0]
def predict(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:
        if os.environ["RANK"] == "1":
            raise DataError("item 3 of the data cannot be read")
        time.sleep(float(os.environ["COMPUTE_SECONDS"]))
    return original(*args, **kwargs)
evaluation.predict = predict
sys.argv[0] = "modelfix"
from modelfix.cli import main
main()
"""


@pytest.mark.parametrize("compute_seconds", [0, 60], ids=["in-a-collective", "computing"])
def test_error_on_one_rank_after_the_agreement_ends_every_rank_with_exit_2_and_writes_nothing(model, tmp_path,
                                                                                             compute_seconds):
    """Under torchrun, which stops (SIGTERM) the survivors of a failed process: a survivor that waited in a
    collective has already ended with the failure's line and code; one still computing ends with them on SIGTERM."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    script = tmp_path / "late_failure.py"
    script.write_text(LATE_FAILURE)
    done = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", str(script), "--no-progress",
                           "evaluate", str(model), "--data", "decoy-digits:test", "--poison", "0,1",
                           "-o", str(tmp_path / "out")], env=env(COMPUTE_SECONDS=str(compute_seconds)),
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith(("error", "interrupted", "terminated"))]
    assert lines == ["error: rank 1: item 3 of the data cannot be read"] * 2, done.stderr  # one line per process
    assert done.stderr.count("exitcode  : 2") == 2, done.stderr  # torchrun's summary: both ended with exit 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late_failure.py"]  # no folder, no staging


def small_cnn():
    """A seeded egem-cnn (conv layers: spatial galleries, fragility bounds) and 90 decoy-digits training items with
    their masks: the same model and data in every process and in this one."""
    from modelfix.data import load_data
    from modelfix.zoo import Classifier, build_net, default_input_spec

    torch.manual_seed(0)
    model = Classifier(build_net("egem-cnn", 10, 1, (28, 28)), default_input_spec("egem-cnn")).eval()
    return model, load_data("decoy-digits:train").subset(slice(0, 90))


def sharded_results() -> dict:
    """Every sharded computation, on `small_cnn`, with batch sizes that leave uneven blocks (90 items = 6 batches of
    16 of which the last has 10; 45 items of batch 8 = 6 batches, 3 per process)."""
    from modelfix.discover import discover
    from modelfix.explain.attribution import attribute, attribution_details
    from modelfix.explain.reliance import reliance_by_level
    from modelfix.feedback import top_activations
    from modelfix.fragility import fragility
    from modelfix.repair.annotate import annotate
    from modelfix.repair.egem_full import full_stats

    model, data = small_cnn()
    x, y = data.x[:45], data.y[:45]
    smooth = attribution_details(model, x, y, method="smoothgrad", samples=2, batch_size=8, seed=3, shard=True)
    lrp = attribution_details(model, x, y, method="lrp", batch_size=8, shard=True)
    top = top_activations(model, data, "pool2", k=5, batch_size=16, progress=False)
    counts = torch.arange(90) % 3  # integer multiplicities, some 0, as the refinement split gives
    stats = full_stats(model, data, counts, ["conv2", "fc1"], batch_size=16, progress=False)
    found = discover(model, data, classes=[0, 1], method="gradient", max_items=12, neighbors=3, max_clusters=3,
                     embedding="spectral", batch_size=4, progress=False)
    return {
        "smoothgrad": smooth.values, "smoothgrad_logits": smooth.logits,
        "lrp": lrp.values, "lrp_sums": lrp.expected_sum,
        "reliance": reliance_by_level(model, data, data.info["artifact"], (0.0, 1.0), ("random",),
                                      lambda xb, t: attribute(model, xb, t, method="gradient"), batch_size=16),
        "fragility": fragility(model, data, 0.05, batch_size=16),
        "annotate": annotate(model, data, tau=0.05, batch_size=16).mask,
        "top": (top.values, top.indices, top.cells, top.map_size),
        "egem_full": [t for name in ("conv2", "fc1") for t in stats[name]],
        "discover_maps": [c.maps for c in found.classes], "discover_labels": [list(c.labels) for c in found.classes],
    }


def sharded_worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(sharded_results(), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_computations_on_two_processes_equal_one_process(tmp_path):
    """annotate, explain/discover heatmaps, evaluate --explain and --fragility, feedback gallery and egem-full:
    every process gets the one-process result; each process computed only its block (whole batches), so the
    per-item numbers are bit for bit those of one process."""
    torch.set_num_threads(1)
    expected = sharded_results()  # no process group here: one process
    torch.multiprocessing.spawn(sharded_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got.keys() == expected.keys()
        for key in expected:
            if key == "egem_full":  # float64 sums of two blocks added: other rounding than one running sum
                for a, b in zip(got[key], expected[key]):
                    assert torch.allclose(a, b, rtol=1e-12, atol=0), key
            elif key == "discover_maps" or key == "top":
                assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                           for a, b in zip(got[key], expected[key])), key
            elif isinstance(expected[key], torch.Tensor):
                assert torch.equal(got[key], expected[key]), key
            else:
                assert got[key] == expected[key], key  # reliance rows, fragility, cluster labels: exactly
    assert len(expected["top"][1][0]) == 5 and expected["reliance"][1]["n"] > 0  # the checks saw real work


# Several commands in one process group, as `run_app` runs one (rank 0 alone prints): one start-up of the processes
# for all of them (the start-up is most of a small command's time).
COMMANDS = """
import json, os, sys
from modelfix import distributed, progress
from modelfix.cli import app
from modelfix.cli.base import err
distributed.init()
if not distributed.is_main():
    progress.MUTED = True
    sys.stdout, err.file = open(os.devnull, "w"), open(os.devnull, "w")
for args in json.loads(sys.argv[1]):
    try:
        app(["--no-progress", *args])
    except SystemExit as exc:
        if exc.code:
            raise
distributed.check_peers()
distributed.shutdown()
"""


def test_explain_annotate_gallery_discover_prune_crayon_under_two_processes_equal_one_process(model, small_data,
                                                                                               tmp_path):
    import numpy as np

    feedback = tmp_path / "neurons.csv"
    feedback.write_text("layer,neuron,verdict\n" + "".join(f"relu1,{j},no\n" for j in range(0, 512, 3)))
    def commands(out: Path, crayon_batch: int) -> list[list[str]]:
        return [[str(a) for a in args] for args in (
            ["explain", model, "--data", small_data, "--method", "smoothgrad", "--samples", "2", "--limit", "40",
             "--batch-size", "8", "-o", out / "explain"],
            ["annotate", model, "--data", small_data, "--tau", "0.05", "--batch-size", "16", "-o", out / "masks.npz"],
            ["feedback", "gallery", model, "--data", small_data, "--top-k", "5", "--batch-size", "16",
             "-o", out / "gallery"],
            ["discover", model, "--data", small_data, "--classes", "0,1", "--explain", "gradient", "--max-items", "12",
             "--neighbors", "3", "--max-clusters", "3", "--embedding", "spectral", "--batch-size", "4",
             "-o", out / "discover"],
            ["prune-crayon", model, "--feedback", feedback, "--data", small_data, "--epochs", "1",
             "--batch-size", crayon_batch, "-o", out / "pruned.safetensors"])]

    for args in commands(tmp_path / "one", 64):
        result = run(*args)
        assert result.exit_code == 0, (args, result.stderr)
    procs = launch(*[[json.dumps(commands(tmp_path / "two", 32))]] * 2, program=("-c", COMMANDS))
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr + procs[1].stderr
    assert procs[1].stdout == procs[1].stderr == ""
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # rank 0's files alone
    a, b = np.load(one / "explain" / "attributions.npz"), np.load(two / "explain" / "attributions.npz")
    assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    assert sorted((one / "explain" / "heatmaps").iterdir()) != [] and \
        [p.name for p in sorted((two / "explain" / "heatmaps").iterdir())] == \
        [p.name for p in sorted((one / "explain" / "heatmaps").iterdir())]
    a, b = np.load(one / "masks.npz"), np.load(two / "masks.npz")
    assert np.array_equal(a["mask"], b["mask"]) and a["mask"].sum() == 96 * 39  # 39 = round(0.05 * 784) per image
    assert (one / "gallery" / "patches.json").read_text() == (two / "gallery" / "patches.json").read_text()
    clusters = [json.loads((folder / "discover" / "clusters.json").read_text()) for folder in (one, two)]
    for doc in clusters:
        doc.pop("seconds")
    assert clusters[0] == clusters[1]
    assert_close_weights(one / "pruned.safetensors", two / "pruned.safetensors")
