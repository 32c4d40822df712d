"""Mixed precision for the training loop and inference: an autocast context and a gradient scaler per precision.

`fp32` is plain float32 (a no-op context). `bf16` autocasts to bfloat16 on CUDA and CPU; its exponent range is
float32's, so it needs no loss scaling. `fp16` autocasts to float16 on CUDA only, with a `GradScaler` against
underflowing gradients; CPU float16 autocast is refused (slow and unsupported for many ops).

`full_precision` switches autocast off again inside a block: the guided penalties compute their second-order terms
(input gradients differentiated again, interval bounds) there, in float32 (docs/finetunes.md, "Mixed precision").
"""

from __future__ import annotations

import contextlib

import torch

from modelfix.errors import ModelfixError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: str | torch.device) -> torch.device:
    """Refuse an unknown precision, fp16 off CUDA, and bf16 on a CUDA device without bfloat16 support."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ModelfixError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ModelfixError(f"precision fp16 needs a CUDA device, not {device.type}",
                            hint="use --precision bf16 (or fp32) on this device")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelfixError("this GPU does not support bfloat16", hint="use --precision fp16")
    return device


def autocast(precision: str, device: str | torch.device):
    """The context a forward pass (and its loss) runs under; backward runs outside it."""
    device = check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: str | torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (disabled, it passes losses and steps through unchanged):
    `scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update()`."""
    device = check_precision(precision, device)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def full_precision(device: str | torch.device):
    """Autocast off inside the block (float32 from float32 inputs), whatever the caller enabled: the place for terms
    that must not be rounded to 16 bits (double backprop, whose inner gradient no loss scaler protects, and sound
    interval bounds). Tensors made under autocast before the block keep their dtype."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def autocast_enabled(device: str | torch.device) -> bool:
    """Whether an autocast context is active for `device`'s type."""
    return torch.is_autocast_enabled(torch.device(device).type)
