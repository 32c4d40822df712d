"""From what a user names to what the library takes: checkpoints, data specs, the default evaluation data."""

from __future__ import annotations

from pathlib import Path

import warnings

from modelfix.errors import ModelfixError, ModelfixWarning


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """'0.1,0.2' → (0.1, 0.2); None stays None; anything else is one error naming the option."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise ModelfixError(f"{option} must be comma-separated numbers, not '{text}'") from None


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'28x28' or '224' → (H, W); refuses sizes no image classifier takes."""
    if text is None:
        return None
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise ModelfixError(f"--input-size must look like 28x28 or 224, not '{text}'")
    if max(sizes) > 8192:
        raise ModelfixError(f"--input-size {text} is larger than 8192 pixels on a side", hint="give the size the model "
                            "was trained at, e.g. 224")
    return (sizes[0], sizes[-1])


def device_name(name: str) -> str:
    """auto → cuda when present, else cpu; an unavailable device is one error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelfixError(f"--device {name} asked for, but CUDA is not available here", hint="use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelfixError("--device mps asked for, but MPS is not available here", hint="use --device cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ModelfixError(f"--device must be auto, cpu, cuda, cuda:N or mps, not '{name}'")
    return name


def load_checkpoint(path: Path, trust: bool = False, device: str = "cpu", arch=None, num_classes=None,
                    in_channels=None, input_size=None, mean=None, std=None):
    """(model, card) of a checkpoint, with the card-less overrides as the user typed them."""
    from modelfix.checkpoint import ModelOverrides, load_model

    if num_classes is not None and num_classes < 1:
        raise ModelfixError(f"--num-classes must be at least 1, not {num_classes}")
    if in_channels is not None and in_channels < 1:
        raise ModelfixError(f"--in-channels must be at least 1, not {in_channels}")
    stds = parse_floats(std, "--std")
    if stds and any(not s > 0 for s in stds):
        raise ModelfixError(f"--std values must be positive, not '{std}'")
    overrides = ModelOverrides(arch=arch, num_classes=num_classes, in_channels=in_channels,
                               input_size=parse_size(input_size), mean=parse_floats(mean, "--mean"), std=stds)
    return load_model(path, overrides, trust=trust, device=device)


def check_fits(data, card, spec: str) -> None:
    """Refuse data the model cannot take, before any work is done."""
    c, h, w = data.shape
    want = (card.input.channels, card.input.height, card.input.width)
    if (c, h, w) != want:
        raise ModelfixError(
            f"data '{spec}' has images {c}×{h}×{w} but the model expects {want[0]}×{want[1]}×{want[2]}",
            hint="resize the images or pass the right --input-size/--in-channels for the checkpoint",
        )
    if len(data) and int(data.y.max()) >= card.num_classes:
        raise ModelfixError(f"data '{spec}' has label {int(data.y.max())} but the model has {card.num_classes} classes")
    warn_out_of_range(data, card, spec)


def warn_out_of_range(data, card, spec: str) -> None:
    """Warn (not refuse: augmented or standardised data may stray a little) when in-memory pixels lie far outside
    the card's value_range: float images in 0–255 given to a 0–1 model evaluate without error but mean nothing."""
    x = getattr(data, "x", None)  # a lazy on-disk source is decoded to the value range by the loader
    if x is None or not x.numel():
        return
    lo, hi = card.input.value_range
    span = hi - lo
    low, high = float(x.min()), float(x.max())
    if low < lo - span or high > hi + span:
        warnings.warn(f"data '{spec}' has values in [{low:g}, {high:g}], far outside the model's value range "
                      f"[{lo:g}, {hi:g}] (images in 0-255? divide by 255)", ModelfixWarning, stacklevel=2)


def parse_columns(text: str | None):
    """'path=file,label=diagnosis' → Columns naming those manifest columns (the rest keep their defaults)."""
    from modelfix.data import Columns

    if not text:
        return None
    names = {}
    for part in str(text).split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("path", "label", "mask", "group") or not value.strip():
            raise ModelfixError(f"--columns takes path=COL,label=COL[,mask=COL,group=COL], not '{text}'")
        names[key.strip()] = value.strip()
    return Columns(**names, required_optional=True)


def has_default_names(card) -> bool:
    """A card-less checkpoint (no history, classes named 0..K-1 only): the data's class folders may name them. A
    card modelfix wrote keeps its names, so a folder class it does not know stays an error."""
    return not card.history and list(card.class_names) == [str(i) for i in range(card.num_classes)]


def load_dataset(spec: str, data_root=None, seed: int = 0, masks=None, card=None, class_names=None,
                 reading: dict | None = None, stream: bool = False):
    """The dataset of `spec` (folder, manifest, bundle, SCENARIO[:SPLIT]), named with the card's classes (or
    `class_names`) and checked against the card when one is given. `reading` (the CLI's data options: resize,
    crop_pct, workers, skip_bad, max_pixels, columns) brings images of any size and mode to the card's input as a
    lazy `ImageSource` read with `workers` DataLoader workers. `stream=True` (commands whose every pass goes through
    `modelfix.data.batches`) returns that source as it is; otherwise it is decoded into whole tensors here
    (`to_dataset`, bounded by its memory guard). docs/data.md lists which commands stream."""
    from modelfix.data import ImageSource, load_data, to_dataset

    reading = dict(reading or {})
    workers = reading.pop("workers", 0) or 0
    if workers < 0:
        raise ModelfixError(f"--workers must be >= 0, not {workers}")
    columns = parse_columns(reading.pop("columns", None))
    resize = reading.pop("resize", None)
    lazy = resize is not None or reading.get("skip_bad") or str(spec).lower().endswith((".csv", ".tsv"))
    if card is not None:
        class_names = None if has_default_names(card) else card.class_names  # a card-less file: the data name them
    data = load_data(spec, data_root=data_root, seed=seed, mask_dir=masks, class_names=class_names,
                     input_spec=card.input if card is not None and lazy else None, resize=resize, columns=columns,
                     **{k: v for k, v in reading.items() if v is not None})
    if isinstance(data, ImageSource):
        data.workers = workers
        data = data if stream else to_dataset(data)
    if card is not None:
        check_fits(data, card, spec)
    return data


def data_info(spec: str, data) -> dict:
    """What a card's history and a report say about a dataset."""
    return {"spec": spec, "n": len(data), "classes": list(data.class_names), "checksum": data.checksum(),
            "name": data.name, "info": {k: v for k, v in data.info.items() if isinstance(v, (str, int, float, bool))}}


def default_test_split(card) -> str:
    scenario = (card.dataset or {}).get("scenario")
    if not scenario:
        raise ModelfixError("no --data given and the model card names no built-in scenario", hint="pass --data DIR")
    return f"{scenario}:test"
