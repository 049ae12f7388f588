"""The distributed contract, owned here: joining torchrun's process group (`join`) and leaving it (`leave`),
what passes between the processes (`Process.any`, `Process.sum`), and which images each one takes
(`Process.shard`; the training sampler draws the same epoch everywhere and takes `Process.shard` of it too).
Without torchrun a run is one process of one, and every call here is a no-op."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from balatro_train.device import resolve_device

log = logging.getLogger("balatro_train")


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

    def shard(self, items):
        """This process's share of `items`: every `world`-th one from `rank` on."""
        return items[self.rank :: self.world]

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set in any process (every process must call it at the same point)."""
        if self.world == 1:
            return flag
        value = torch.tensor(1.0 if flag else 0.0, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor summed over every process, in place."""
        if self.world > 1:
            for tensor in tensors:
                dist.all_reduce(tensor)
        return tensors


ALONE = Process(0, 1, torch.device("cpu"))  # a process of its own on the CPU: the default for one-process tools


def join(device_name: str) -> Process:
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
    log.info(
        "distributed: %d processes, backend %s, %d CPU threads per process", world, backend, torch.get_num_threads()
    )
    return Process(rank, world, device)


def leave() -> None:
    """Leave the process group, if this process joined one (the job's end, whatever the outcome)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_first_process() -> bool:
    """Whether this is the first process of a torchrun job (or the only one), before `join` has run."""
    return int(os.environ.get("RANK", "0")) == 0
