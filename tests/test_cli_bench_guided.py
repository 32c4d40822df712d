"""`bench tap-mnist` and `bench cost` through the CLI on tiny settings: options reach the benchmark, JSON is strict."""

import json

import pytest

from cli_helpers import assert_one_line_error, run


def test_bench_tap_mnist_cli_with_a_lambda_override(tmp_path):
    out = tmp_path / "tap.json"
    result = run("bench", "tap-mnist", "--scenario", "decoy-digits", "--epochs", "1", "--train-size", "32",
                 "--test-size", "20", "--cases", "no-xs,rbr", "--lambda", "rbr=3", "-o", out)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(out.read_text())
    assert set(doc["cases"]) == {"no-xs", "rbr"}
    assert doc["cases"]["rbr"]["hyperparameters"] == {"lam": 3.0}
    assert doc["settings"]["train_size"] == 32 and doc["settings"]["test_size"]["permuted"] == 20
    assert "no-xs" in result.stdout and "(0.819)" in result.stdout  # ours next to the paper's permuted number


def test_bench_cost_cli_json():
    result = run("bench", "cost", "--archs", "mlp", "--methods", "rrr", "--repeats", "1", "--warmup", "0", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {row["method"]: row for row in json.loads(result.stdout)["archs"]["mlp"]["rows"]}
    assert set(rows) == {"erm", "rrr"} and rows["erm"]["ratio_time"] == 1.0 and rows["rrr"]["step_ms"] > 0


def test_bench_bad_options():
    assert_one_line_error(run("bench", "tap-mnist", "--cases", "nope"), "nope")
    assert_one_line_error(run("bench", "tap-mnist", "--lambda", "base=1"), "no penalty weight")
    assert_one_line_error(run("bench", "tap-mnist", "--lambda", "rbr"), "--lambda")
    assert_one_line_error(run("bench", "cost", "--archs", "vgg99"), "vgg99")
    # r4-mnist: checked before any data is read
    assert_one_line_error(run("bench", "r4-mnist", "--methods", "erm", "--lambda", "erm=1"), "has no λ")
    assert_one_line_error(run("bench", "r4-mnist", "--methods", "rrr", "--lambda", "rrr=-1"), "> 0")
    assert_one_line_error(run("bench", "r4-mnist", "--methods", "rrr", "--lambda", "rrr"), "--lambda")


def test_bench_crayon_mnist_cli_on_decoy_digits(tmp_path):
    out = tmp_path / "crayon.json"
    result = run("bench", "crayon-mnist", "--scenario", "decoy-digits", "--methods", "original,crayon-attention",
                 "--original-epochs", "1", "--attention-epochs", "1", "--beta", "3", "--test-size", "30", "-o", out)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(out.read_text())
    assert set(doc["methods"]) == {"original", "crayon-attention"}
    assert doc["methods"]["crayon-attention"]["fb"]["mean"] == doc["settings"]["mlp"]["train_size"] == 3237
    assert doc["settings"]["mlp"]["beta"] == 3.0
    (candidate,) = doc["methods"]["crayon-attention"]["selection"][0]["candidates"]  # a single β is scored too
    assert candidate["value"] == 3.0 and (candidate["val_accuracy"] * 30) == pytest.approx(round(candidate["val_accuracy"] * 30))
    assert "original" in result.stdout and "0.853" in result.stdout  # the paper's number beside ours
    assert_one_line_error(run("bench", "crayon-mnist", "--methods", "nope"), "nope")
    assert_one_line_error(run("bench", "crayon-mnist", "--beta", "3,x"), "--beta")  # lists: comma-separated numbers
    assert_one_line_error(run("bench", "crayon-mnist", "--crayon-loss", "nope"), "--crayon-loss")


def test_bench_r4_mnist_smoke_with_a_lambda_override(tmp_path, mnist_root):
    # The real benchmark on a sliver of MNIST: settings, λ override and R4's summaries reach the JSON.
    out = tmp_path / "r4.json"
    result = run("bench", "r4-mnist", "--data-root", mnist_root, "--methods", "erm,rrr", "--restarts", "1",
                 "--epochs", "1", "--train-size", "300", "--test-size", "60", "--lambda", "rrr=0.5", "-o", out)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(out.read_text())
    assert set(doc["cases"]) == {"erm", "rrr"} and doc["n_train"] == 300 and doc["n_test"]["permuted"] == 60
    assert doc["cases"]["rrr"]["hyperparameters"]["lam"] == 0.5 and doc["lambda_override"] == {"rrr": 0.5}
    for case in doc["cases"].values():
        permuted = case["permuted"]
        assert 0 <= permuted["worst_group_accuracy"] <= permuted["macro_group_accuracy"] <= 1
        assert case["delta_masked"] >= 0 and case["paper"] is not None
    assert "(63.89)" in result.stdout  # ERM next to R4's number
