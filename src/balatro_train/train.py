"""The training run: `python -m balatro_train` (or `balatro-train`) with Hydra overrides.

Read top to bottom: `main` (Hydra's entry; the job plumbing is in job.py) -> `train`, the story:
build the data, the model, the optimizer; then for each epoch `train_one_epoch`, `validate`, log,
checkpoint, stop early -> `training_step`, where the loss is. Everything configurable is built from
`conf/` with `hydra.utils.instantiate`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
import warnings
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import CatMetric, MeanMetric

from balatro_train.checkpoint import Progress, check_compatible, load_checkpoint, save_checkpoint, training_checkpoint
from balatro_train.config import CONFIG_DIR, check_config, typed_config
from balatro_train.data import build_data, make_loaders
from balatro_train.device import autocast, resolve_precision, start_process
from balatro_train.embedding import IGNORE, task_loss, unknown_thresholds
from balatro_train.progress import TrainingProgress
from balatro_train.run_log import HParams, RunLog, epoch_row, log_epoch, write_predictions
from balatro_train.errors import UserError
from balatro_train.job import run_hydra_job
from balatro_train.metrics import build_metrics, new_loss_means
from balatro_train.model import build_model, head_factories, keep_frozen_batchnorm_in_eval
from balatro_train.optim import step_scheduler, weight_average
from balatro_train.resume import carry_best_checkpoint, interrupt, restore, resume_epoch
from balatro_train.run_folder import check_run_folder

log = logging.getLogger("balatro_train")
# conf/hydra/launcher/{joblib,submitit_slurm}.yaml complete the plugins' configs of the same name
# on purpose; Hydra would warn about that at every composition.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema",
                        category=UserWarning)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra's task function: `train` inside the job plumbing (balatro_train/job.py); returns the
    best combined validation loss, for sweepers."""
    return run_hydra_job(cfg, train)


def train(cfg: DictConfig, out_dir: Path, stop: threading.Event | None = None,
          hparams: HParams | dict | None = None) -> float:
    """Train as `cfg` says, writing the run folder `out_dir`; returns the best combined validation loss.

    Needs no Hydra runtime: `cfg` is a composed config (the CLI's, or `hydra.compose(...)` in tests).
    Setting `stop` (the CLI sets it on Ctrl-C) ends the run at the next step with a resumable last.pt.
    `hparams`: what TensorBoard's HPARAMS view shows of the run (job.py's, from Hydra; by default the
    main numbers of `cfg`).
    """
    cfg, stop = typed_config(cfg), stop or threading.Event()
    check_config(cfg)
    seed_everything(cfg.seed)
    process = start_process(cfg.trainer.device)
    if process.is_main:
        check_run_folder(out_dir, cfg.resume)  # another run's metrics, checkpoints and events stay its own
    resumed = load_checkpoint(cfg.resume, "resume") if cfg.resume else None
    source = resumed or (load_checkpoint(cfg.init_from, "init_from") if cfg.init_from else None)
    data = read_data(cfg, source, resumed, out_dir, process)

    model = start_model(cfg, data.class_names, source, resumed).to(process.device)
    averaged = weight_average(model, cfg.trainer.ema_decay, resumed)  # None unless trainer.ema_decay
    step_model, eval_model = for_steps(model, cfg.trainer.compile, process.world, averaged)
    optimizer = instantiate(cfg.optimizer)(model)
    scheduler = instantiate(cfg.scheduler)(optimizer)
    amp_dtype = resolve_precision(cfg.trainer.precision, process.device)
    scaler = torch.amp.GradScaler(process.device.type, enabled=amp_dtype == torch.float16)
    forward = autocast(process.device, amp_dtype)
    loss_fns = build_losses(cfg, model.heads, data.class_names, process.device)
    metrics = {task: build_metrics(task, cfg.tasks[task].metrics, len(names)).to(process.device)
               for task, names in data.class_names.items()}
    train_loader, val_loader = make_loaders(cfg, data, process.device, process.rank, process.world)
    progress = Progress() if resumed is None else restore(resumed, optimizer, scheduler, scaler, cfg.resume)
    thresholds = (resumed or {}).get("unknown_thresholds", {})  # embedding heads' "unknown", per validation
    checkpoints = out_dir / "checkpoints"
    if process.is_main:  # a resumed run's metrics.jsonl starts with the earlier epochs, and its best model
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in progress.history))
        if resumed is not None:
            carry_best_checkpoint(resumed, Path(cfg.resume), checkpoints)
    log.info("training on %s, precision %s, output in %s", process.device,
             str(amp_dtype or torch.float32).replace("torch.", ""), out_dir)

    def checkpoint() -> dict:
        return training_checkpoint(cfg, progress, model, optimizer, scheduler, scaler, data, averaged, thresholds)

    with RunLog(out_dir, cfg, HParams.of(cfg, hparams), list(loss_fns), progress.history, process.is_main,
                process.world) as run_log:
        for epoch in range(progress.epoch + 1, cfg.trainer.epochs + 1):
            started, lrs = time.perf_counter(), {group["name"]: group["lr"] for group in optimizer.param_groups}
            seen, loss_means = resume_epoch(progress, loss_fns, process.device)
            train_loader.sampler.set_epoch(epoch, start=seen)
            seen, loss_means = train_one_epoch(step_model, train_loader, optimizer, scaler, loss_fns, forward,
                                               process.device, stop, seen, loss_means, averaged,
                                               progress=run_log.training_progress(epoch))
            if stop.is_set():
                interrupt(progress, epoch, seen, loss_means, checkpoint, process, out_dir)
            train_seconds = time.perf_counter() - started
            val_losses, results, predictions, confidences, top_logits = validate(
                eval_model, val_loader, loss_fns, metrics, forward, process.device, run_log.validation_bar(epoch))
            thresholds = unknown_thresholds(model.heads, top_logits, cfg.tasks)
            row = epoch_row(epoch, cfg.trainer.combine_losses, loss_means, val_losses, results, lrs,
                            time.perf_counter() - started, seen * process.world / train_seconds)
            check_finite(row, checkpoints)
            improved = progress.record(row)
            step_scheduler(scheduler, row["val_loss"])
            if process.is_main:
                run_log.epoch(row, results, data, predictions, confidences, improved)
                if improved and process.world == 1:
                    write_predictions(out_dir / "val_predictions.json", data, predictions)
                save_checkpoint(checkpoint(), [checkpoints / "last.pt"] + [checkpoints / "best.pt"] * improved
                                + [checkpoints / f"epoch_{epoch:03d}.pt"] * (epoch % cfg.trainer.checkpoint_interval == 0))
            log_epoch(row, cfg.trainer.epochs, improved, list(loss_fns))
            if cfg.trainer.patience and progress.bad_epochs >= cfg.trainer.patience:
                log.info("early stop: val_loss has not improved for %d epochs", progress.bad_epochs)
                break
        run_log.finish(progress, checkpoints, cfg.resume)
    return progress.best_val_loss


# ---- the steps -----------------------------------------------------------------------------------

def training_step(model, images, targets, optimizer, scaler, loss_fns, forward) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch; returns each task's (class-weighted) mean loss, still on the device.
    The gradient is that of the sum of the task losses."""
    with forward():
        outputs = model(images)
        losses = {task: fn(outputs[task].float(), targets[task]) for task, fn in loss_fns.items()}
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(sum(losses.values())).backward()
    scaler.step(optimizer)
    scaler.update()
    return losses


def train_one_epoch(model, loader, optimizer, scaler, loss_fns, forward, device, stop, seen: int = 0,
                    loss_means: dict[str, MeanMetric] | None = None, averaged=None, desc: str = "training",
                    progress: TrainingProgress | None = None):
    """Train on the loader's batches; returns (images seen this epoch, each task's MeanMetric of the
    training loss). Starts at image `seen` of the epoch with the means so far (after an interrupt)
    and stops early once `stop` is set. `averaged` (an EMA of the weights) follows every step. Losses stay on the device: `progress` (the bar, the step-level
    loss in TensorBoard) reads them back only every trainer.log_every_n_steps steps."""
    model.train()
    keep_frozen_batchnorm_in_eval(model)
    loss_means = loss_means or new_loss_means(loss_fns, device)
    progress = progress or TrainingProgress(desc)
    for images, targets in progress.over(loader, seen):
        # counted on the host, before the copy: a task skips the images whose target is IGNORE (data.recolour)
        learned_from = {task: int((target != IGNORE).sum()) for task, target in targets.items()}
        images = images.to(device, non_blocking=True)
        targets = {task: target.to(device, non_blocking=True) for task, target in targets.items()}
        losses = training_step(model, images, targets, optimizer, scaler, loss_fns, forward)
        if averaged is not None:
            averaged.update_parameters(model)
        for task, loss in losses.items():  # one value per image the task learned from: the epoch's mean
            loss_means[task].update(loss.detach().expand(learned_from[task]))
        seen += len(images)
        progress.after_step(loss_means, seen)
        if stop_everywhere(stop, device):
            break
    return seen, loss_means


@torch.no_grad()
def validate(model, loader, loss_fns, metrics, forward, device, bar=iter):
    """One pass over the validation data (through `bar`, which may draw one) gives every task's mean
    loss, metrics and each image's top logit (all gathered from every process by torchmetrics), and
    this process's predictions with their probabilities."""
    model.eval()
    loss_means = new_loss_means(loss_fns, device)
    top_logits = {task: CatMetric(nan_strategy="disable").to(device) for task in loss_fns}
    predictions, confidences = {task: [] for task in loss_fns}, {task: [] for task in loss_fns}
    for metric in metrics.values():
        metric.reset()
    for images, targets in bar(loader):
        with forward():
            outputs = model(images.to(device, non_blocking=True))
        for task, fn in loss_fns.items():
            logits, target = outputs[task].float(), targets[task].to(device, non_blocking=True)
            loss_means[task].update(fn(logits, target).expand(len(images)))
            metrics[task].update(logits, target)
            top_logits[task].update(logits.max(dim=1).values)
            predicted = logits.argmax(dim=1)
            predictions[task].append(predicted)
            confidences[task].append(logits.softmax(dim=1).gather(1, predicted[:, None])[:, 0])
    return ({task: mean.compute().item() for task, mean in loss_means.items()},
            {task: metric.compute() for task, metric in metrics.items()},
            {task: torch.cat(p).cpu() for task, p in predictions.items()},
            {task: torch.cat(p).cpu() for task, p in confidences.items()},
            {task: torch.as_tensor(values.compute()).reshape(-1).cpu() for task, values in top_logits.items()})


# ---- set-up, and what the loop does besides the steps ------------------------------------------------

def read_data(cfg, source: dict | None, resumed: dict | None, out_dir: Path, process) -> object:
    """The run's data: a resumed run keeps its split and class indices; init_from keeps the class
    indices. The split (and what was skipped) is written to the run folder by the first process."""
    if source is not None:
        check_compatible(source, cfg, "resume" if resumed else "init_from")
    if cfg.dataset.render is not None:
        instantiate(cfg.dataset.render)
    data = build_data(cfg, source and source["class_names"], resumed and resumed["split"])
    if process.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "split.json").write_text(json.dumps(data.split, indent=1))
        if data.skipped:
            (out_dir / "skipped_images.json").write_text(json.dumps(data.skipped, indent=1))
    log.info("data: %d training and %d validation images; classes: %s", len(data.train), len(data.val),
             ", ".join(f"{task} {len(names)}" for task, names in data.class_names.items()))
    if cfg.trainer.batch_size % process.world or cfg.trainer.batch_size // process.world < 2:
        raise UserError(f"trainer.batch_size={cfg.trainer.batch_size} is the global batch: make it a multiple "
                        f"of the {process.world} processes, with at least 2 images per process (BatchNorm needs 2)")
    return data


def start_model(cfg, class_names: dict[str, list[str]], source: dict | None, resumed: dict | None = None) -> nn.Module:
    """The configured model with its freeze strategy; from a checkpoint's weights (resume,
    init_from), rebuilt from that checkpoint's own model config, which check_compatible has
    compared with this run's. A checkpoint's `model` is its EMA where the run kept one; a resumed
    run goes on from the weights it was training."""
    if source is None:
        model = build_model(cfg.model, class_names, heads=head_factories(cfg))
    else:
        weights = (resumed or {}).get("training_weights") or source["model"]
        model = build_model(source["config"]["model"], class_names, weights, head_factories(source["config"]))
        model.pretrained_loaded = source["pretrained_loaded"]
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


def check_finite(row: dict, checkpoints: Path) -> None:
    if not all(math.isfinite(row[k]) for k in ("train_loss", "val_loss")):
        raise UserError(f"epoch {row['epoch']}: the loss became {row['train_loss']} / {row['val_loss']}; "
                        "lower the learning rate (optimizer.lr) or use trainer.precision=32. "
                        + (f"The last good checkpoint is {checkpoints / 'last.pt'}" if row["epoch"] > 1
                           else "No checkpoint was written."))


def stop_everywhere(stop: threading.Event, device: torch.device) -> bool:
    """Whether any process was asked to stop: under DDP all must leave the epoch at the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return stop.is_set()
    flag = torch.tensor(1.0 if stop.is_set() else 0.0, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        stop.set()
    return stop.is_set()


def build_losses(cfg, heads, class_names: dict[str, list[str]], device) -> dict[str, torch.nn.Module]:
    """Each task's loss (`embedding.task_loss` for its head) with its class weights and label smoothing."""
    return {task: task_loss(heads[task], class_weights(task, cfg.tasks[task], names),
                            cfg.tasks[task].label_smoothing).to(device) for task, names in class_names.items()}


def class_weights(task: str, task_cfg, names: list[str]) -> torch.Tensor | None:
    """Loss weights given by class name in the task YAML; classes not named weigh 1."""
    if not task_cfg.class_weights:
        return None
    unknown = sorted(set(task_cfg.class_weights) - set(names))
    if unknown:
        raise UserError(f"tasks.{task}.class_weights names unknown classes {unknown} "
                        f"(known: {', '.join(names[:20])})")
    return torch.tensor([float(task_cfg.class_weights.get(name, 1.0)) for name in names])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


if __name__ == "__main__":
    main()
