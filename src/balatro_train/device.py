"""Where a run or a recogniser computes and in which precision: decided here, once (kept light:
no trainer imports, so that inference loads quickly). The processes of a torchrun job: distributed.py."""

from __future__ import annotations

import functools

import torch

from balatro_train.errors import UserError


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{key}={name} but no CUDA device is visible; use {key}=auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"{key}={name} is not a device: use auto, cpu, cuda or cuda:N") from None


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32. `auto` takes bf16 where the hardware runs it fast."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "16"
        else:
            precision = "bf16" if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else "32"
    return {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[precision]


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """The one autocast context of a run: `with autocast():` around every forward pass."""
    return functools.partial(
        torch.autocast, device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    )
