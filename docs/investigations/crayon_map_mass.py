"""Why β = 30 collapses CRAYON-ATTENTION on DecoyMNIST (issue 18): the mass of the saliency map against the task loss.

Trains the preprint's original `crayon-mlp` (30 epochs, Adam 1e-3, wd 1e-4, batch 256, decoy-mnist:train, seed 0,
as `bench crayon-mnist`), takes the items the paper's rule marks "no" (> 20 % of the map in the four 4×4 corners)
among the first `--items` training images and prints, per map:

- mass Σ_hw M of the max-normalised map and the preprint's "no" term at the start of the fine-tune, Σ_hw M'M = Σ M²
  (M' = M before the first step), with β·term / CE for the preprint's β = 30;
- the released code's form (BigData'24): Σ M'_raw M / Σ M with M'_raw the raw map, CE summed, β divided by #no.

    MODELFIX_DATA=../shared/data OMP_NUM_THREADS=1 python docs/investigations/crayon_map_mass.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from modelfix.card import ModelCard
from modelfix.data import load_scenario
from modelfix.explain.gradcam import normalise_maps
from modelfix.feedback import corner_region
from modelfix.training import TrainConfig, train
from modelfix.zoo import build_model, default_input_spec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    data = load_scenario("decoy-mnist", "train", seed=0)
    card = ModelCard(arch="crayon-mlp", num_classes=10, input=default_input_spec("crayon-mlp"))
    torch.manual_seed(0)
    model = build_model(card)
    train(model, data, TrainConfig(optimizer="adam", lr=1e-3, batch_size=256, epochs=args.epochs, weight_decay=1e-4,
                                   seed=0), progress=False)
    model.eval()
    part = data.subset(slice(0, args.items))
    x = part.x.clone().requires_grad_(True)
    logits = model(x)
    ce = F.cross_entropy(logits, part.y, reduction="none")
    (g_logit,) = torch.autograd.grad(logits.gather(1, part.y[:, None]).sum(), x, retain_graph=True)
    (g_loss,) = torch.autograd.grad(ce.sum(), x)
    raw = {"|dz_y/dx| (modelfix, input-gradient map)": g_logit.abs().sum(1),
           "|x * dz_y/dx| (gradient x input)": (part.x * g_logit).abs().sum(1),
           "|dCE/dx| (loss gradient)": g_loss.abs().sum(1)}
    corners = corner_region(part, 4).mask[:1, 0]  # 1×28×28, the four 4×4 corners
    ours = normalise_maps(raw["|dz_y/dx| (modelfix, input-gradient map)"])
    no = ((ours * corners).sum((1, 2)) / ours.sum((1, 2))) > 0.2  # the paper's rule on modelfix's map
    n_no = int(no.sum())
    print(f"{args.items} items, {n_no} 'no' by the paper's rule; CE per item: mean {float(ce.mean()):.4f} "
          f"(on the 'no' items {float(ce[no].mean()):.4f})")
    for name, r in raw.items():
        m = normalise_maps(r)[no]
        mass, term = m.sum((1, 2)), (m * m).sum((1, 2))
        released = (r[no] * m).sum((1, 2)) / m.sum((1, 2))
        print(f"{name}: max-normalised mass Σ M {float(mass.mean()):.1f} (median {float(mass.median()):.1f}); "
              f"preprint 'no' term Σ M'M at start {float(term.mean()):.2f}; 30 × term / CE "
              f"{30 * float(term.mean()) / float(ce[no].mean()):.0f}; per-pixel mean (÷784): 30 × term / 784 / CE "
              f"{30 * float(term.mean()) / 784 / float(ce[no].mean()):.2f}; raw map max {float(r[no].amax((1, 2)).mean()):.3g}; "
              f"released term Σ M'_raw M / Σ M {float(released.mean()):.3g}")


if __name__ == "__main__":
    main()
