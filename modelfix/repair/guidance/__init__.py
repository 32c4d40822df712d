"""Guided fine-tunes: training objectives that use the pixel masks (1 = spurious) to steer a model away from a
shortcut (methods_guided_finetunes.md). Each objective is `objective(model, batch) -> (loss, parts)` for
`modelfix.training.train`, with `loss = task + λ·penalty` and `parts` holding at least "task" and "penalty".

- `TAP` (tap.py): penalise hooked conv activations under the downscaled mask (Zhang et al., AAAI 2024);
- `RRR` (rrr.py): penalise masked input gradients (Ross et al., IJCAI 2017; TAP's reduction);
- `RBR` (rbr.py): penalise masked gradient × influence term (Shao et al., AAAI 2021; full influence gradient);
- `L2Objective` (l2.py): ERM + explicit L2, the baseline every mask method must beat.

Input gradients are taken with respect to the network input z = (x − mean)/std, so the λ values of the papers apply.
"""

from modelfix.repair.guidance.l2 import L2Objective, l2_penalty
from modelfix.repair.guidance.rbr import RBR, influence_input_gradient, rbr_penalty
from modelfix.repair.guidance.rrr import RRR, TARGETS, eval_mode, input_gradient, network_input, rrr_penalty
from modelfix.repair.guidance.tap import TAP, default_tap_layers, downscale_masks, resolve_tap_layers, tap_penalty

__all__ = [
    "L2Objective", "RBR", "RRR", "TAP", "TARGETS", "default_tap_layers", "downscale_masks", "eval_mode",
    "influence_input_gradient", "input_gradient", "l2_penalty", "network_input", "rbr_penalty", "resolve_tap_layers",
    "rrr_penalty", "tap_penalty",
]
