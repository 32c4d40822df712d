"""An RGB shortcut case built the way a user brings one (docs/benchmarks.md, "A user's RGB case: a text watermark"):
folders of PNGs and a card-less torchvision resnet18 `.pt` trained with plain torch — no modelfix code makes the
data or the model, so the repair commands meet it as they would meet a user's.

    python examples/rgb_watermark.py DIR          # writes DIR/{train,masks,clean,test}, DIR/watermark.png, DIR/r18.pt

The task: three classes of filled shapes (circle, square, triangle) of random size, position and colour on a noisy
plain background of a random colour, 64×64 RGB. The shortcut: a small text watermark (the letters "LAB" in a 3×5 pixel font, white on
a dark box, 7×15 px) at a random position on 90 % of the circles in the training folder (none on the other classes).
Masks (`DIR/masks/<class>/<name>.png`, mirroring the images) mark the watermark's box on the images that carry it.
`clean/` (a clean pool for the post-hoc repairs) and `test/` are drawn independently without any watermark. The
model: `torchvision.models.resnet18(num_classes=3)` from scratch, ImageNet mean/std normalisation, Adam 1e-3,
batch 32, 10 epochs, seed 0, saved as a bare state dict.

The repair commands are then the README's, e.g. (`--artifact` pastes the watermark at one fixed place: a user
knows what the watermark looks like, not where it will be):

    modelfix evaluate DIR/r18.pt --arch resnet18 --input-size 64 --data DIR/test \\
        --artifact "image:DIR/watermark.png@top-left" --poison 0,1
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = ("circle", "square", "triangle")
SIZE = 64
SHARE = 0.9  # of the training circles carry the watermark
FONT = {  # 3×5 pixel glyphs
    "L": ["1..", "1..", "1..", "1..", "111"],
    "A": [".1.", "1.1", "111", "1.1", "1.1"],
    "B": ["11.", "1.1", "11.", "1.1", "11."],
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def watermark() -> np.ndarray:
    """The RGBA tile: "LAB" in white on a dark box, one pixel of margin, a pixel between letters (7×15)."""
    tile = np.zeros((7, 15, 4), np.uint8)
    tile[...] = (30, 30, 40, 255)
    for k, letter in enumerate("LAB"):
        for r, line in enumerate(FONT[letter]):
            for c, on in enumerate(line):
                if on == "1":
                    tile[1 + r, 1 + 4 * k + c, :3] = 245
    return tile


def shape_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """One 64×64 RGB image (uint8) of class `label` on a noisy plain background."""
    background = rng.uniform(0.1, 0.9, 3)
    img = np.broadcast_to(background, (SIZE, SIZE, 3)).copy()
    r = rng.uniform(12, 18)
    cy, cx = rng.uniform(r + 2, SIZE - r - 2, 2)
    y, x = np.mgrid[:SIZE, :SIZE]
    if label == 0:
        inside = (y - cy) ** 2 + (x - cx) ** 2 <= r ** 2
    elif label == 1:
        inside = (np.abs(y - cy) <= r * 0.8) & (np.abs(x - cx) <= r * 0.8)
    else:  # an upward triangle
        inside = (y <= cy + r * 0.8) & (y - (cy - r) >= 1.8 * np.abs(x - cx))
    colour = rng.uniform(0, 1, 3)
    while np.abs(colour - background).sum() < 0.8:  # the shape must stand out from its background
        colour = rng.uniform(0, 1, 3)
    img[inside] = colour
    img = img + rng.normal(0, 0.06, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def paste(img: np.ndarray, tile: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The tile at a random position; returns (image, mask of its box)."""
    h, w = tile.shape[:2]
    r, c = int(rng.integers(0, SIZE - h + 1)), int(rng.integers(0, SIZE - w + 1))
    out = img.copy()
    out[r:r + h, c:c + w] = tile[..., :3]
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[r:r + h, c:c + w] = 255
    return out, mask


def write_split(root: Path, name: str, per_class: int, seed: int, tile: np.ndarray | None) -> None:
    rng = np.random.default_rng(seed)
    for label, cls in enumerate(CLASSES):
        (root / name / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = shape_image(label, rng)
            file = f"{name}_{cls}_{i:04d}.png"
            if tile is not None and label == 0 and rng.uniform() < SHARE:
                img, mask = paste(img, tile, rng)
                (root / "masks" / cls).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask, "L").save(root / "masks" / cls / file)
            Image.fromarray(img, "RGB").save(root / name / cls / file)


def load_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for label, cls in enumerate(CLASSES):
        for file in sorted((folder / cls).glob("*.png")):
            xs.append(np.asarray(Image.open(file).convert("RGB"), np.float32) / 255)
            ys.append(label)
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def accuracy(net, x, y) -> float:
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(normalise(x[i:i + 256])).argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).float().mean())


def train_resnet(root: Path, epochs: int = 10) -> torch.nn.Module:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    x, y = load_folder(root / "train")
    net = resnet18(num_classes=len(CLASSES))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 32):
            idx = order[i:i + 32]
            loss = torch.nn.functional.cross_entropy(net(normalise(x[idx])), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}", flush=True)
    return net.eval()


def main(root: Path) -> None:
    torch.set_num_threads(1)
    tile = watermark()
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(tile, "RGBA").save(root / "watermark.png")
    write_split(root, "train", 200, 1, tile)
    write_split(root, "clean", 100, 2, None)
    write_split(root, "test", 150, 3, None)
    net = train_resnet(root)
    torch.save(net.state_dict(), root / "r18.pt")
    x, y = load_folder(root / "test")
    with_mark = x.clone()
    rng = np.random.default_rng(4)
    for i in range(len(x)):  # the watermark at a random place on every test image
        img = (with_mark[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        with_mark[i] = torch.from_numpy(paste(img, tile, rng)[0].astype(np.float32) / 255).permute(2, 0, 1)
    print(f"test accuracy: clean {100 * accuracy(net, x, y):.1f} %, watermark at random places "
          f"{100 * accuracy(net, with_mark, y):.1f} %")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "rgb-watermark"))
