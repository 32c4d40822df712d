"""bench crayon-mnist on the embedded decoy-digits scenario at a tiny budget: the result's structure, the simulated
feedback accounting (sample verdicts cover every training item, crayon-pruning and random-pruning prune the same
number of channels), finite scores, and option validation before any data is read."""

from __future__ import annotations

import math

import pytest

from modelfix.bench import crayon_mnist
from modelfix.errors import ModelfixError


@pytest.fixture(scope="module")
def result():
    return crayon_mnist.run(scenario="decoy-digits", seeds=2, train_size=150, test_size=60, original_epochs=2,
                            attention_epochs=1, prune_train_size=100, prune_epochs=1, prune_fc_epochs=2,
                            progress=False)


def test_structure_and_scores(result):
    assert set(result["methods"]) == set(crayon_mnist.METHODS)
    assert len(result["runs"]) == 2 * len(crayon_mnist.METHODS)
    assert result["settings"]["mlp"]["train_size"] == 150
    assert result["settings"]["cnn"]["train_size"] == 100
    assert result["settings"]["test_size"] == {"permuted": 60, "contaminated": 60}
    for name, entry in result["methods"].items():
        assert entry["model"] == ("crayon-mlp" if name in crayon_mnist.MLP_METHODS else "tap-cnn")
        assert entry["paper_accuracy"] == crayon_mnist.PAPER.get(name)
        for test in ("permuted", "contaminated"):
            acc = entry[test]["accuracy"]
            worst = entry[test]["worst_group_accuracy"]
            assert len(acc["values"]) == 2 and all(0.0 <= v <= 1.0 for v in acc["values"])
            assert acc["mean"] == pytest.approx(sum(acc["values"]) / 2)
            # the worst of the 10 label groups can never beat the macro mean over them
            for w, m in zip(worst["values"], entry[test]["macro_group_accuracy"]["values"]):
                assert math.isfinite(w) and w <= m + 1e-12
        assert all(math.isfinite(s) and s >= 0 for s in entry["seconds"]["values"])


def test_feedback_accounting(result):
    methods = result["methods"]
    for counts in methods["crayon-attention"]["feedback"]:
        assert sum(counts.values()) == 150 and counts["yes"] == 0  # the DecoyMNIST rule has no "yes"
    assert methods["crayon-attention"]["fb"]["values"] == [150, 150]
    assert methods["rrr"]["fb"]["values"] == [150, 150]
    assert methods["train-more"]["fb"]["values"] == [0, 0] and methods["random-pruning"]["fb"]["values"] == [0, 0]
    for seed in (0, 1):
        crayon = next(r for r in result["runs"] if r["method"] == "crayon-pruning" and r["seed"] == seed)
        random = next(r for r in result["runs"] if r["method"] == "random-pruning" and r["seed"] == seed)
        assert crayon["layer"] == random["layer"] == "pool2"
        assert crayon["n_channels"] == 100 and crayon["fb"] == 100
        assert crayon["feedback"]["no"] + crayon["feedback"]["yes"] == 100
        assert crayon["n_pruned"] == random["n_pruned"] == crayon["feedback"]["no"] == len(random["pruned"])


def test_method_subset_runs_one_part():
    out = crayon_mnist.run(scenario="decoy-digits", train_size=50, test_size=30, original_epochs=1,
                           attention_epochs=1, methods=("original", "train-more"), progress=False)
    assert list(out["methods"]) == ["original", "train-more"]
    assert {r["method"] for r in out["runs"]} == {"original", "train-more"}


@pytest.mark.parametrize("options, words", [
    ({"methods": ("original", "crayon")}, "unknown method 'crayon'"),
    ({"methods": ()}, "--methods"),
    ({"seeds": 0}, "--seeds"),
    ({"train_size": 0}, "--train-size"),
    ({"attention_epochs": 0}, "--attention-epochs"),
    ({"beta": -1.0}, "--beta"),
    ({"rrr_lam": float("nan")}, "--rrr-lambda"),
    ({"prune_fc_lr": 0.0}, "--prune-fc-lr"),
    ({"prune_arch": "no-such-net"}, "--prune-arch"),
    ({"scenario": "egem-mnist"}, "--scenario"),
])
def test_options_validated_before_loading(options, words):
    # data_root points nowhere: a data read would raise a different error
    with pytest.raises(ModelfixError, match=words.replace("(", r"\(")) as err:
        crayon_mnist.run(data_root="/nonexistent", progress=False, **options)
    assert "\n" not in str(err.value)


def test_beta_and_lambda_lists_are_chosen_on_validation_only(monkeypatch):
    """Lists of β and λ: each candidate is scored on the permuted VALIDATION split (before any test split), the best
    validation accuracy wins (ties: the smaller), and the choice and the preprint's lr schedule reach the result."""
    scored = []
    real = crayon_mnist.metrics

    def spy(pred, data):
        scored.append(data.name)
        return real(pred, data)

    monkeypatch.setattr(crayon_mnist, "metrics", spy)
    out = crayon_mnist.run(scenario="decoy-digits", seeds=1, train_size=120, test_size=40, original_epochs=1,
                           attention_epochs=2, beta=[3.0, 0.3], rrr_lam=[1e-6, 1e-2], lr_schedule="exponential",
                           methods=("original", "crayon-attention", "rrr"), progress=False)
    # original: 2 tests; crayon-attention: 2 candidates on val, then 2 tests; rrr likewise
    val, tests = "decoy-digits:val-permuted", ["decoy-digits:test-permuted", "decoy-digits:test-contaminated"]
    assert scored == tests + [val, val] + tests + [val, val] + tests
    for method, values in (("crayon-attention", [0.3, 3.0]), ("rrr", [1e-6, 1e-2])):
        (row,) = [r for r in out["runs"] if r["method"] == method]
        candidates = row["selection"]["candidates"]
        assert [c["value"] for c in candidates] == values
        best = max(candidates, key=lambda c: (c["val_accuracy"], -c["value"]))
        assert row["chosen"] == row["selection"]["chosen"] == best["value"]
        assert out["methods"][method]["chosen"] == [best["value"]]
    assert out["settings"]["mlp"]["lr_schedule"].startswith("x0.975")
    assert out["settings"]["mlp"]["selected_on"] == "val-permuted"
    (row,) = [r for r in out["runs"] if r["method"] == "crayon-attention"]
    assert row["final_loss"]["lr"] == pytest.approx(1e-3 * 0.975)  # epoch 2 of the exponential schedule
