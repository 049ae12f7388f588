"""What a run computes with, built in one place (`build_run`) for `train()` and for the speed benchmark
(bench.py): the model (from a checkpoint's weights where the run starts from one), its EMA, the training
and validation views of it, the optimizer, scheduler, gradient scaler, precision, losses, metrics and
loaders. Everything configurable comes from `conf/` through `hydra.utils.instantiate`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from balatro_train.checkpoint import Checkpoint
from balatro_train.data import Data
from balatro_train.device import autocast, resolve_precision
from balatro_train.distributed import Process
from balatro_train.embedding import task_loss
from balatro_train.errors import UserError
from balatro_train.loaders import make_loaders
from balatro_train.metrics import build_metrics
from balatro_train.model import build_model, head_factories
from balatro_train.optim import weight_average


@dataclass
class Run:
    """The objects a run's steps use. `model` is the plain model (its state dict is the checkpoint's);
    `step_model` what the training steps call (compiled with trainer.compile, wrapped by DDP under
    torchrun); `eval_model` what validation calls (the EMA of the weights where trainer.ema_decay keeps one)."""

    process: Process
    model: nn.Module
    step_model: nn.Module
    eval_model: nn.Module
    averaged: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    precision: torch.dtype | None  # the autocast dtype; None: float32
    forward: Callable  # the run's autocast context: `with run.forward():` around every forward pass
    losses: dict[str, nn.Module]
    metrics: dict[str, nn.Module]
    train_loader: DataLoader
    val_loader: DataLoader


def build_run(
    cfg, data: Data, process: Process, source: Checkpoint | None = None, resumed: Checkpoint | None = None
) -> Run:
    """Everything a run of `cfg` on `data` needs, on `process.device`. `source`: the checkpoint whose
    weights start it (resume or init_from); `resumed`: the one it continues (its training weights; the
    optimizer, scheduler and scaler states are restored by `Checkpoint.restore`)."""
    model = start_model(cfg, data.class_names, source, resumed).to(process.device)
    averaged = weight_average(model, cfg.trainer.ema_decay)  # None unless trainer.ema_decay
    step_model, eval_model = for_steps(model, cfg.trainer.compile, process.world, averaged)
    optimizer = instantiate(cfg.optimizer)(model)
    precision = resolve_precision(cfg.trainer.precision, process.device)
    metrics = {
        task: build_metrics(task, cfg.tasks[task].metrics, len(names)).to(process.device)
        for task, names in data.class_names.items()
    }
    train_loader, val_loader = make_loaders(cfg, data, process)
    return Run(
        process,
        model,
        step_model,
        eval_model,
        averaged,
        optimizer,
        instantiate(cfg.scheduler)(optimizer),
        torch.amp.GradScaler(process.device.type, enabled=precision == torch.float16),
        precision,
        autocast(process.device, precision),
        build_losses(cfg, model.heads, data.class_names, process.device),
        metrics,
        train_loader,
        val_loader,
    )


def start_model(
    cfg, class_names: dict[str, list[str]], source: Checkpoint | None, resumed: Checkpoint | None = None
) -> nn.Module:
    """The configured model with its freeze strategy; from a checkpoint's weights (resume,
    init_from), rebuilt from that checkpoint's own model config, which check_compatible has
    compared with this run's. A checkpoint's weights are its EMA where the run kept one; a resumed
    run goes on from the weights it was training."""
    if source is None:
        model = build_model(cfg.model, class_names, heads=head_factories(cfg))
    else:
        model = source.model(training_weights=resumed is not None).train()
    model.use_channels_last(cfg.trainer.channels_last)
    instantiate(cfg.freeze)(model)
    return model


def for_steps(model: nn.Module, compile_model: bool, world: int, averaged=None) -> tuple[nn.Module, nn.Module]:
    """(the model the training steps call, the one validation calls). torch.compile and DDP wrap the
    same parameters, so checkpoints keep the plain model's keys; validation shards are uneven, so
    under DDP it runs on the unwrapped model (DDP's forward would wait for the other processes).
    With an EMA of the weights, validation runs on the average."""
    compiled = torch.compile(model) if compile_model else model
    return (DistributedDataParallel(compiled) if world > 1 else compiled), (averaged.module if averaged else compiled)


def build_losses(cfg, heads, class_names: dict[str, list[str]], device) -> dict[str, torch.nn.Module]:
    """Each task's loss (`embedding.task_loss` for its head) with its class weights and label smoothing."""
    return {
        task: task_loss(heads[task], class_weights(task, cfg.tasks[task], names), cfg.tasks[task].label_smoothing).to(
            device
        )
        for task, names in class_names.items()
    }


def class_weights(task: str, task_cfg, names: list[str]) -> torch.Tensor | None:
    """Loss weights given by class name in the task YAML; classes not named weigh 1."""
    if not task_cfg.class_weights:
        return None
    unknown = sorted(set(task_cfg.class_weights) - set(names))
    if unknown:
        raise UserError(f"tasks.{task}.class_weights names unknown classes {unknown} (known: {', '.join(names[:20])})")
    return torch.tensor([float(task_cfg.class_weights.get(name, 1.0)) for name in names])
