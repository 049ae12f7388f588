"""Where a run or a recogniser computes and in which precision: decided here, once (kept light:
no trainer imports, so that inference loads quickly)."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from balatro_train.errors import UserError


log = logging.getLogger("balatro_train")


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
    return functools.partial(torch.autocast, device.type, dtype=amp_dtype or torch.float32,
                             enabled=amp_dtype is not None)


@dataclass(frozen=True)
class Process:
    """This process's place in the run: `rank` of `world` processes (1 without torchrun), on `device`."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the first process writes files; all of them train."""
        return self.rank == 0


def start_process(device_name: str) -> Process:
    """Resolve trainer.device; under torchrun (WORLD_SIZE > 1) also join the process group, NCCL with
    one GPU per process (cuda:LOCAL_RANK), gloo on the CPU."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Process(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if rank != 0:  # one voice in the log
        log.setLevel(logging.WARNING)
    log.info("distributed: %d processes, backend %s, %d CPU threads per process", world, backend,
             torch.get_num_threads())
    return Process(rank, world, device)
