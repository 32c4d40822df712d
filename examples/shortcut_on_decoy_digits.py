"""Train a shortcut model on the embedded decoy digits and show the shortcut, with the Python API.

    python examples/shortcut_on_decoy_digits.py [OUT_DIR]

Writes OUT_DIR/shortcut.safetensors (with its card), OUT_DIR/eval/results.json and OUT_DIR/eval/report.md.
"""

import sys
from pathlib import Path

import torch

from modelfix import InputSpec, ModelCard, TrainConfig, build_model, evaluate, load_scenario, parse_artifact, save_model, train
from modelfix.report import results_document, write_run

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example")
data = load_scenario("decoy-digits", "train")
test = load_scenario("decoy-digits", "test")

card = ModelCard(arch="mlp", num_classes=10, class_names=data.class_names, input=InputSpec(1, 28, 28, (0.0,), (1.0,)),
                 artifact=data.info["artifact"], dataset={"scenario": "decoy-digits", "checksum": data.checksum()})
torch.manual_seed(0)
model = build_model(card)
config = TrainConfig(optimizer="adam", lr=1e-3, epochs=10, batch_size=128)
result = train(model, data, config)
save_model(model, card.with_history({"command": "train", "method": "erm", "config": config.to_dict()}),
           out / "shortcut.safetensors")

evaluation = evaluate(model, test, parse_artifact(card.artifact), levels=(0.0, 1.0), labels=("correlated", "random"))
for row in evaluation["levels"]:
    print(f"poison {row['level']:g} {row['labels'] or '':>10}: accuracy {row['accuracy']:.3f}, "
          f"worst group {row['worst_group_accuracy']:.3f}")
doc = results_document("example", {"path": str(out / "shortcut.safetensors"), "arch": "mlp", "num_classes": 10},
                       {"spec": "decoy-digits:test", "n": len(test), "checksum": test.checksum()}, evaluation)
write_run(out / "eval", doc)
