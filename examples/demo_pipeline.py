"""The demo's story with the Python API on the built-in `tagged-digits` scenario: train a shortcut model, repair it
post hoc (EGEM) and with a guided fine-tune (RRR), evaluate all three clean and poisoned, and save the repairs.

    python examples/demo_pipeline.py [OUT_DIR]

Writes OUT_DIR/{shortcut,egem,rrr}.safetensors (each with its card) and prints one line per model. About 30 s on
2 CPU cores. `modelfix demo` runs every method this way (modelfix/demo.py).
"""

import dataclasses
import sys
from pathlib import Path

import torch

import modelfix
from modelfix import ModelCard, TrainConfig, build_model, evaluate, load_scenario, parse_artifact, save_model, train
from modelfix.zoo import default_input_spec

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo-pipeline")
train_data = load_scenario("tagged-digits", "train")  # the tag on 80 % of the training 8s, with its masks
clean = load_scenario("tagged-digits", "clean")  # training items without the tag: the refinement pool
test = load_scenario("tagged-digits", "test")
artifact = parse_artifact(train_data.info["artifact"])  # pixels:tag

# 1. the shortcut: egem-cnn, plain ERM
card = ModelCard(arch="egem-cnn", num_classes=10, class_names=train_data.class_names,
                 input=default_input_spec("egem-cnn"), artifact=str(artifact), dataset={"scenario": "tagged-digits"})
torch.manual_seed(0)
shortcut = build_model(card)
train(shortcut, train_data, TrainConfig(optimizer="adam", lr=3e-3, batch_size=64, epochs=3, seed=0), progress=False)
shortcut.eval()

# 2. post hoc: EGEM on 100 correctly predicted clean samples per class, at position-aware points
result = modelfix.repair(shortcut, clean, "egem", samples_per_class=100, slack=0.1, progress=False)
egem = result.model

# 3. guided fine-tune: RRR with the tag's region as the mask of every training image ("the corner is irrelevant")
_, footprint = artifact.apply(train_data.x[:1])
masked = dataclasses.replace(train_data, mask=footprint.expand(len(train_data), -1, -1, -1).clone(),
                             has_mask=torch.ones(len(train_data), dtype=torch.bool))
subset = masked.subset(torch.randperm(len(masked), generator=torch.Generator().manual_seed(0))[:1000])
rrr = modelfix.repair(shortcut, subset, "rrr", lam=1e-4, optimizer="adam", lr=1e-3, batch_size=32, epochs=2,
                      progress=False).model.eval()

# 4. clean vs poisoned (the tag pasted on every test image)
for name, model in (("shortcut", shortcut), ("egem", egem), ("rrr", rrr)):
    clean_row, poisoned_row = evaluate(model, test, artifact, levels=(0.0, 1.0), labels=("random",),
                                       progress=False)["levels"]
    print(f"{name:9s} clean {100 * clean_row['accuracy']:5.1f} %  poisoned {100 * poisoned_row['accuracy']:5.1f} %  "
          f"gap {100 * (clean_row['accuracy'] - poisoned_row['accuracy']):5.1f} points")
    history = {"command": "example", "method": name}
    save_model(model, card.with_history(history), out / f"{name}.safetensors")
print(f"EGEM chose α = {result.selection.value} ({result.selection.rule}); models in {out}/")
for warning in result.warnings:
    print("warning:", warning)
