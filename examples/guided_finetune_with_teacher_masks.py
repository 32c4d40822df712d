"""Repair a decoy-digits shortcut model with RRR, once with the scenario's patch masks and once with teacher masks.

    python examples/guided_finetune_with_teacher_masks.py [OUT_DIR]

1. ERM on decoy-digits: the mlp reads the label off the corner patch.
2. A teacher: the same mlp trained on the clean split (the val digits without the patch, 179 images).
3. Teacher masks: per training image, the 1 % least-salient pixels of the teacher (TAP's annotation).
4. RRR fine-tunes with the ground-truth masks and with the teacher masks, λ chosen on `val-permuted`.
Prints test accuracy with the patch in the true label's colour and in a random colour, and writes the models.
"""

import sys
from pathlib import Path

import torch

import modelfix
from modelfix import InputSpec, ModelCard, TrainConfig, build_model, evaluate, load_scenario, parse_artifact, save_model, train
from modelfix.repair.annotate import annotate

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/guided")
data, clean = load_scenario("decoy-digits", "train"), load_scenario("decoy-digits", "clean")
val, test = load_scenario("decoy-digits", "val-permuted"), load_scenario("decoy-digits", "test")
card = ModelCard(arch="mlp", num_classes=10, class_names=data.class_names, input=InputSpec(1, 28, 28, (0.0,), (1.0,)),
                 artifact=data.info["artifact"], dataset={"scenario": "decoy-digits", "checksum": data.checksum()})
adam = TrainConfig(optimizer="adam", lr=1e-3, epochs=10, batch_size=128)


def fresh():
    torch.manual_seed(0)
    return build_model(card)


def report(name, model):
    rows = evaluate(model, test, parse_artifact(card.artifact), levels=(1.0,), labels=("correlated", "random"))["levels"]
    print(f"{name:>24}: contaminated {rows[0]['accuracy']:.3f}, permuted {rows[1]['accuracy']:.3f}")


shortcut = fresh()
train(shortcut, data, adam)
report("ERM (shortcut)", shortcut)

teacher = fresh()
train(teacher, clean, TrainConfig(optimizer="adam", lr=1e-3, epochs=30, batch_size=32))
teacher_masks = annotate(teacher, data, tau=0.01)

for name, masks in (("RRR, ground-truth masks", data), ("RRR, teacher masks", teacher_masks)):
    result = modelfix.repair(shortcut, masks, "rrr", val=val, lambdas=[1e-6, 1e-5], optimizer="adam", lr=1e-3,
                             epochs=5, batch_size=128)
    print(f"{name}: λ = {result.selection.value:g} ({result.selection.rule})")
    report(name, result.model)
    save_model(result.model, card.with_history({"command": "example", "method": "rrr", "result": result.to_dict()}),
               out / f"{name.split(', ')[1].split()[0]}.safetensors")
