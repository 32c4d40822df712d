"""Bring your own checkpoint, image folder, masks and artifact image: evaluate the shortcut with the Python API.

    python examples/folder_workflow.py MODEL.pt ARCH DATA_DIR ARTIFACT_SPEC [MASK_DIR]

for example `python examples/folder_workflow.py xray.pt resnet18 test/ "image:tag.png@bottom-right" test_masks/`.
DATA_DIR holds <class>/<image> files; MASK_DIR mirrors it (non-zero = spurious).
"""

import json
import sys

from modelfix import ModelOverrides, evaluate, load_data, load_model, parse_artifact

model_path, arch, data_dir, artifact_spec = sys.argv[1:5]
mask_dir = sys.argv[5] if len(sys.argv) > 5 else None

model, card = load_model(model_path, ModelOverrides(arch=arch))  # classes and channels are read off the weights
data = load_data(data_dir, mask_dir=mask_dir, class_names=card.class_names)
results = evaluate(model, data, parse_artifact(artifact_spec), levels=(0.0, 0.5, 1.0), labels="none")
print(json.dumps([{k: row[k] for k in ("level", "accuracy", "macro_group_accuracy", "worst_group_accuracy")}
                  for row in results["levels"]], indent=2))
