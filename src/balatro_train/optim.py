"""The learning-rate schedule with warmup (conf/scheduler/warmup_cosine.yaml), how a scheduler is
stepped, and the exponential moving average of the weights (trainer.ema_decay): the pieces of the
recipe that torch provides as parts, put together once here."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, ReduceLROnPlateau, SequentialLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from balatro_train.errors import UserError


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    epochs: int,
    warmup_epochs: int = 2,
    warmup_start_factor: float = 0.1,
    eta_min: float = 1e-6,
) -> LRScheduler:
    """Linear warmup from `warmup_start_factor` x lr over `warmup_epochs`, then cosine decay to
    `eta_min` by the last epoch; stepped once per epoch, as torchvision's reference recipe does."""
    warmup_epochs = min(warmup_epochs, epochs - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, epochs - warmup_epochs), eta_min=eta_min)
    if warmup_epochs <= 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=warmup_start_factor, total_iters=warmup_epochs)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_epochs])


def step_scheduler(scheduler, val_loss: float) -> None:
    """One epoch's scheduler step (ReduceLROnPlateau on the combined validation loss)."""
    with warnings.catch_warnings():
        # A run resumed from an interrupt after an epoch's last step has no step left in that epoch, so
        # its scheduler steps with no optimizer step in between: exactly what the uninterrupted run did.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(val_loss)
        else:
            scheduler.step()


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """The exponential moving average of `model`'s weights and BatchNorm statistics, updated after every
    optimizer step (1 / (1 - decay) steps is its memory), or None when `decay` is 0. It is what a run
    validates and saves as its model; a resumed run continues the average it saved (`Checkpoint.restore`)."""
    if not decay:
        return None
    if not 0 < decay < 1:
        raise UserError(f"trainer.ema_decay={decay}: use 0 (off) or a number between 0 and 1, e.g. 0.99")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
