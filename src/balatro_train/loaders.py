"""The run's loaders: batches of the decoded training and validation images, uint8 (N, H, W, 3) all the way to
the device. The training sampler draws each epoch from the run seed and the epoch alone (`EpochSampler`), so
an interrupted run resumes with the same batches and augmentations; under torchrun each process loads its
`Process.shard` of the draws and of the validation images."""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch.utils.data import DataLoader, Sampler, Subset

from balatro_train.data import Data
from balatro_train.distributed import ALONE, Process


class EpochSampler(Sampler):
    """Draws an epoch's (index, augmentation seed) pairs from the run seed and the epoch alone.

    Shuffles, or with `weights` draws with replacement so that classes come up evenly. Under
    DDP every process makes the same draw, padded to a multiple of the processes, and takes its
    `Process.shard` of it.
    Like DistributedSampler, call `set_epoch` before each epoch; nothing else carries state,
    which is what makes resume exact.
    """

    def __init__(self, num_samples: int, seed: int, weights: torch.Tensor | None = None, process: Process = ALONE):
        self.num_samples, self.seed, self.weights, self.epoch, self.start = num_samples, seed, weights, 0, 0
        self.process, self.world = process, process.world

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """`start` skips the epoch's first draws: those an interrupted run had already trained on."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world) - self.start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        seeds = torch.randint(0, 2**31 - 1, (self.num_samples,), generator=generator)
        draws = list(zip(order.tolist(), seeds.tolist(), strict=True))
        if self.world > 1:  # every process draws the same epoch and takes its share, padded to equal length
            draws += draws[: math.ceil(len(draws) / self.world) * self.world - len(draws)]
            draws = self.process.shard(draws)
        return iter(draws[self.start :])


def balanced_weights(labels: list[str]) -> torch.Tensor:
    """Per-sample weights that make every class equally likely to be drawn."""
    counts = Counter(labels)
    return torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.double)


def make_loaders(cfg, data: Data, process: Process = ALONE) -> tuple[DataLoader, DataLoader]:
    """trainer.batch_size is the global batch: each of the run's processes loads its share (`Process.shard`)
    of the training draws and of the validation images."""
    device, world = process.device, process.world
    workers = cfg.trainer.num_workers
    if workers == "auto":  # worker processes pay off only when cores are left beside the model's threads
        threads = torch.get_num_threads()
        workers = 0 if threads <= 2 else min(8, threads // 2)
    workers = int(workers)
    weights = balanced_weights(data.train_labels) if cfg.data.weighted_sampler else None
    # Their own generator: a DataLoader draws a seed for every new iterator, and drawing it from torch's
    # global RNG would shift what the model's Dropout draws after a resume mid-epoch (the sampler and
    # the per-image seeds carry the data's randomness; workers need none of their own).
    common = dict(
        batch_size=cfg.trainer.batch_size // world,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    # A last batch of one image would stop BatchNorm ("expected more than 1 value per channel"): drop it.
    lonely_last = math.ceil(len(data.train) / world) % common["batch_size"] == 1
    train_loader = DataLoader(
        data.train, sampler=EpochSampler(len(data.train), cfg.seed, weights, process), drop_last=lonely_last, **common
    )
    return train_loader, DataLoader(Subset(data.val, process.shard(range(len(data.val)))), **common)
