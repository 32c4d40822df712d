"""`bench tap-mnist` and `bench cost` through the CLI on tiny settings: options reach the benchmark, JSON is strict."""

import json

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


def test_bench_crayon_mnist_cli_on_decoy_digits(tmp_path):
    out = tmp_path / "crayon.json"
    result = run("bench", "crayon-mnist", "--scenario", "decoy-digits", "--methods", "original,crayon-attention",
                 "--original-epochs", "1", "--attention-epochs", "1", "--beta", "3", "--test-size", "30", "-o", out)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(out.read_text())
    assert set(doc["methods"]) == {"original", "crayon-attention"}
    assert doc["methods"]["crayon-attention"]["fb"]["mean"] == doc["settings"]["mlp"]["train_size"] == 3237
    assert doc["settings"]["mlp"]["beta"] == 3.0
    assert "original" in result.stdout and "0.853" in result.stdout  # the paper's number beside ours
    assert_one_line_error(run("bench", "crayon-mnist", "--methods", "nope"), "nope")
