"""Smoke tests of `bench cost` and `bench tap-mnist` on tiny settings: structure and finiteness, not speed."""

from __future__ import annotations

import math

import torch

from modelfix.bench import cost, tap_mnist
from modelfix.data import load_scenario


def test_bench_cost_runs_and_reports_every_method():
    result = cost.run(archs=("mlp", "tap-cnn"), methods=("erm-l2", "tap", "rrr", "rbr"), repeats=1, threads=1,
                      warmup=0, batch_size=4)
    assert result["device"] == "cpu" and "profiler" in result["memory"]
    assert result["threads"] == 1 and torch.get_num_threads() >= 1
    for arch in ("mlp", "tap-cnn"):
        rows = {row["method"]: row for row in result["archs"][arch]["rows"]}
        assert list(rows) == ["erm", "erm-l2", "tap", "rrr", "rbr"]
        assert rows["erm"]["ratio_time"] == 1.0 and rows["erm"]["ratio_mem"] == 1.0
        for name, row in rows.items():
            if arch == "mlp" and name == "tap":  # no conv feature maps: reported, not measured
                assert "conv" in row["error"] and "step_ms" not in row
                continue
            for key in ("step_ms", "ratio_time", "peak_mb", "ratio_mem", "extra_mb"):
                assert math.isfinite(row[key]) and row[key] > 0, (arch, name, key)
            # Gradients are allocated inside the measured step (zero_grad sets them to None before it), so the
            # transient peak is at least one float32 per parameter.
            assert row["extra_mb"] >= result["archs"][arch]["parameters"] * 4 / 2**20
            assert row["peak_mb"] >= row["extra_mb"]
        assert rows["rrr"]["target"] == 3.2 and isinstance(rows["rrr"]["meets_target"], bool)


def test_without_patch_clears_the_patch_and_the_mask():
    data = load_scenario("decoy-digits", "val")
    clean = tap_mnist.without_patch(data, "decoy-digits")
    inside = data.mask.bool().expand_as(data.x)
    assert clean.x[inside].eq(0).all() and torch.equal(clean.x[~inside], data.x[~inside])
    assert not clean.has_mask.any() and torch.equal(clean.y, data.y)


def test_bench_tap_mnist_runs_on_decoy_digits():
    result = tap_mnist.run(scenario="decoy-digits", epochs=1, train_size=16, seeds=1, batch_size=16, test_size=24,
                           teacher_epochs=1, progress=False)
    assert set(result["cases"]) == set(tap_mnist.CASES)
    assert result["settings"]["train_size"] == 16 and result["settings"]["test_size"]["permuted"] == 24
    for case, row in result["cases"].items():
        assert row["failed"] == 0, case
        for test in ("contaminated", "permuted", "clean"):
            assert 0.0 <= row[test]["mean"] <= 1.0 and row[test]["std"] == 0.0 and len(row[test]["values"]) == 1
            assert row["paper"][test][0] == tap_mnist.PAPER[case][test][0]
        assert row["delta"]["mean"] == row["permuted"]["mean"] - row["contaminated"]["mean"]
    n_train = len(load_scenario("decoy-digits", "train"))
    assert result["teachers"]["teacher-0.1"]["n"] == round(0.1 * n_train)
    assert result["teachers"]["teacher-0.01"]["n"] == round(0.01 * n_train)
    assert 0.0 <= result["teachers"]["teacher-0.01"]["accuracy_clean"]["mean"] <= 1.0
    assert len(result["runs"]) == len(tap_mnist.CASES)


def test_bench_r4_mnist_chooses_lambda_on_validation_only(mnist_root, monkeypatch):
    """With a λ grid every candidate is scored on the permuted VALIDATION split (never a test split), the best
    macro-group accuracy wins, and the choice, R4's double-softmax loss and R4's recoloured test reach the result."""
    from modelfix.bench import r4_mnist

    scored = []
    real_metrics = r4_mnist.metrics

    def spy(pred, data):
        scored.append(data.name)
        return real_metrics(pred, data)

    monkeypatch.setattr(r4_mnist, "metrics", spy)
    result = r4_mnist.run(data_root=mnist_root, cases=("rrr",), restarts=1, epochs=1, train_size=300, test_size=60,
                          progress=False, loss="double-softmax", tests=("permuted", "permuted-r4"),
                          lambda_grid={"rrr": [1e-3, 10.0]})
    case = result["cases"]["rrr"]
    selection = case["lambda_selection"]
    assert scored[:2] == ["decoy-mnist:val-permuted"] * 2  # the two candidates, before any test split
    assert scored[2:] == ["decoy-mnist:test-permuted", "decoy-mnist:test-permuted-r4"]
    assert [row["lambda"] for row in selection["candidates"]] == [1e-3, 10.0]
    macro = {row["lambda"]: row["val_macro_group_accuracy"] for row in selection["candidates"]}
    expected = 1e-3 if macro[1e-3] >= macro[10.0] else 10.0
    assert selection["chosen"] == expected == case["hyperparameters"]["lam"]
    assert selection["selected_on"] == "decoy-mnist:val-permuted" and selection["trained_on"] == "decoy-mnist:train"
    assert case["config"]["loss"] == "double-softmax" and result["loss"] == "double-softmax"
    assert set(result["n_test"]) == {"permuted", "permuted-r4"}
