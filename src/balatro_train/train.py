"""The training run: `python -m balatro_train` (or `balatro-train`) with Hydra overrides.

Read top to bottom: `main` (Hydra's entry; the job plumbing is in job.py) -> `train`, the story:
read the data, build the run (run_setup.py), then for each epoch `train_one_epoch`, `validate`, log,
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
from typing import NamedTuple

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchmetrics import CatMetric, MeanMetric

from balatro_train.checkpoint import Checkpoint, Progress, load_checkpoint
from balatro_train.config import CONFIG_DIR, check_config, typed_config
from balatro_train.data import Data, build_data
from balatro_train.distributed import join
from balatro_train.embedding import IGNORE, unknown_thresholds
from balatro_train.errors import UserError
from balatro_train.job import run_hydra_job
from balatro_train.metrics import new_loss_means
from balatro_train.model import keep_frozen_batchnorm_in_eval
from balatro_train.optim import step_scheduler
from balatro_train.progress import TrainingProgress
from balatro_train.resume import carry_best_checkpoint, check_compatible, interrupt, resume_epoch
from balatro_train.run_folder import check_run_folder
from balatro_train.run_log import HParams, RunLog, epoch_row, log_epoch
from balatro_train.run_setup import Run, build_run

log = logging.getLogger("balatro_train")
# conf/hydra/launcher/{joblib,submitit_slurm}.yaml complete the plugins' configs of the same name
# on purpose; Hydra would warn about that at every composition.
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema", category=UserWarning
)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra's task function: `train` inside the job plumbing (balatro_train/job.py); returns the
    best combined validation loss, for sweepers."""
    return run_hydra_job(cfg, train)


def train(
    cfg: DictConfig, out_dir: Path, stop: threading.Event | None = None, hparams: HParams | dict | None = None
) -> float:
    """Train as `cfg` says, writing the run folder `out_dir`; returns the best combined validation loss. Needs
    no Hydra runtime: `cfg` is a composed config (the CLI's, or `hydra.compose(...)` in tests). Setting `stop`
    (the CLI does on Ctrl-C) ends the run at the next step with a resumable last.pt. `hparams`: what
    TensorBoard's HPARAMS view shows (job.py's, from Hydra; by default the main numbers of `cfg`)."""
    cfg, stop, checkpoints = typed_config(cfg), stop or threading.Event(), out_dir / "checkpoints"
    check_config(cfg)
    seed_everything(cfg.seed)
    process = join(cfg.trainer.device)
    if process.is_main:
        check_run_folder(out_dir, cfg.resume)  # another run's metrics, checkpoints and events stay its own
    resumed = load_checkpoint(cfg.resume, "resume") if cfg.resume else None
    source = resumed or (load_checkpoint(cfg.init_from, "init_from") if cfg.init_from else None)
    data = read_data(cfg, source, resumed, out_dir, process)
    run = build_run(cfg, data, process, source, resumed)
    progress = resumed.restore(run.optimizer, run.scheduler, run.scaler, run.averaged) if resumed else Progress()
    thresholds = resumed.unknown_thresholds if resumed else {}  # embedding heads' "unknown", per validation
    start_run_folder(out_dir, run, progress, resumed, cfg.resume)

    def checkpoint() -> Checkpoint:
        return Checkpoint.of_run(
            cfg, progress, run.model, data, thresholds, run.optimizer, run.scheduler, run.scaler, run.averaged
        )

    with RunLog(out_dir, cfg, HParams.of(cfg, hparams), list(run.losses), progress.history, process) as run_log:
        for epoch in range(progress.epoch + 1, cfg.trainer.epochs + 1):
            started, lrs = time.perf_counter(), {group["name"]: group["lr"] for group in run.optimizer.param_groups}
            seen, loss_means = resume_epoch(progress, run.losses, process)
            run.train_loader.sampler.set_epoch(epoch, start=seen)
            trained = train_one_epoch(run, stop, seen, loss_means, run_log.training_progress(epoch))
            if stop.is_set():
                interrupt(progress, epoch, trained.seen, trained.loss_means, checkpoint, process, out_dir)
            images_per_sec = trained.seen * process.world / (time.perf_counter() - started)
            validation = validate(run, run_log.validation_bar(epoch))
            thresholds = unknown_thresholds(run.model.heads, validation.top_logits, cfg.tasks)
            row = epoch_row(
                epoch, cfg.trainer.combine_losses, trained.loss_means, validation, lrs, started, images_per_sec
            )
            check_finite(row, checkpoints)
            improved = progress.record(row)
            step_scheduler(run.scheduler, row["val_loss"])
            if process.is_main:
                run_log.epoch(row, validation, data, improved)
                save_checkpoints(checkpoint(), checkpoints, epoch, improved, cfg.trainer.checkpoint_interval)
            log_epoch(row, cfg.trainer.epochs, improved, list(run.losses))
            if cfg.trainer.patience and progress.bad_epochs >= cfg.trainer.patience:
                log.info("early stop: val_loss has not improved for %d epochs", progress.bad_epochs)
                break
        run_log.finish(progress, checkpoints, cfg.resume)
    return progress.best_val_loss


# ---- the steps -----------------------------------------------------------------------------------


def training_step(run: Run, images, targets) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch; returns each task's (class-weighted) mean loss, still on the device.
    The gradient is that of the sum of the task losses."""
    with run.forward():
        outputs = run.step_model(images)
        losses = {task: fn(outputs[task].float(), targets[task]) for task, fn in run.losses.items()}
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(sum(losses.values())).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return losses


class TrainedEpoch(NamedTuple):
    seen: int  # images trained on in this epoch, by this process
    loss_means: dict[str, MeanMetric]  # each task's mean training loss over the images it learned from


def train_one_epoch(
    run: Run,
    stop: threading.Event,
    seen: int = 0,
    loss_means: dict[str, MeanMetric] | None = None,
    progress: TrainingProgress | None = None,
) -> TrainedEpoch:
    """Train on the run's training batches. Starts at image `seen` of the epoch with the means so far (after
    an interrupt) and stops early once `stop` is set in any process. The EMA of the weights, where the run
    keeps one, follows every step. Losses stay on the device: `progress` (the bar, the step-level loss in
    TensorBoard) reads them back only every trainer.log_every_n_steps steps."""
    device = run.process.device
    run.step_model.train()
    keep_frozen_batchnorm_in_eval(run.step_model)
    loss_means = loss_means or new_loss_means(run.losses, device)
    progress = progress or TrainingProgress("training")
    for images, targets in progress.over(run.train_loader, seen):
        # counted on the host, before the copy: a task skips the images whose target is IGNORE (data.recolour)
        learned_from = {task: int((target != IGNORE).sum()) for task, target in targets.items()}
        images = images.to(device, non_blocking=True)
        targets = {task: target.to(device, non_blocking=True) for task, target in targets.items()}
        losses = training_step(run, images, targets)
        if run.averaged is not None:
            run.averaged.update_parameters(run.model)
        for task, loss in losses.items():  # one value per image the task learned from: the epoch's mean
            loss_means[task].update(loss.detach().expand(learned_from[task]))
        seen += len(images)
        progress.after_step(loss_means, seen)
        if run.process.any(stop.is_set()):  # under DDP all processes leave the epoch at the same step
            stop.set()
            break
    return TrainedEpoch(seen, loss_means)


class Validation(NamedTuple):
    losses: dict[str, float]  # each task's mean loss over every process's images
    results: dict[str, dict]  # each task's metrics, gathered from every process by torchmetrics
    scored: list[int]  # the validation images (indices into data.val) this process scored, in order
    predictions: dict[str, torch.Tensor]  # of the images in `scored`: each task's predicted class
    confidences: dict[str, torch.Tensor]  # and its probability
    top_logits: dict[str, torch.Tensor]  # every process's images' top logit, per task


@torch.no_grad()
def validate(run: Run, bar=iter) -> Validation:
    """One pass over the validation data (through `bar`, which may draw one)."""
    device = run.process.device
    run.eval_model.eval()
    loss_means = new_loss_means(run.losses, device)
    top_logits = {task: CatMetric(nan_strategy="disable").to(device) for task in run.losses}
    predictions, confidences = {task: [] for task in run.losses}, {task: [] for task in run.losses}
    for metric in run.metrics.values():
        metric.reset()
    for images, targets in bar(run.val_loader):
        with run.forward():
            outputs = run.eval_model(images.to(device, non_blocking=True))
        for task, fn in run.losses.items():
            logits, target = outputs[task].float(), targets[task].to(device, non_blocking=True)
            loss_means[task].update(fn(logits, target).expand(len(images)))
            run.metrics[task].update(logits, target)
            top_logits[task].update(logits.max(dim=1).values)
            predicted = logits.argmax(dim=1)
            predictions[task].append(predicted)
            confidences[task].append(logits.softmax(dim=1).gather(1, predicted[:, None])[:, 0])
    return Validation(
        {task: mean.compute().item() for task, mean in loss_means.items()},
        {task: metric.compute() for task, metric in run.metrics.items()},
        list(run.val_loader.dataset.indices),
        {task: torch.cat(p).cpu() for task, p in predictions.items()},
        {task: torch.cat(p).cpu() for task, p in confidences.items()},
        {task: torch.as_tensor(values.compute()).reshape(-1).cpu() for task, values in top_logits.items()},
    )


# ---- set-up, and what the loop does besides the steps ------------------------------------------------


def read_data(cfg, source: Checkpoint | None, resumed: Checkpoint | None, out_dir: Path, process) -> Data:
    """The run's data: a resumed run keeps its split and class indices; init_from keeps the class
    indices. The split (and what was skipped) is written to the run folder by the first process."""
    if source is not None:
        check_compatible(source, cfg, "resume" if resumed else "init_from")
    if cfg.dataset.render is not None:
        instantiate(cfg.dataset.render)
    data = build_data(cfg, source and source.class_names, resumed and resumed.split)
    if process.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "split.json").write_text(json.dumps(data.split, indent=1))
        if data.skipped:
            (out_dir / "skipped_images.json").write_text(json.dumps(data.skipped, indent=1))
    log.info(
        "data: %d training and %d validation images; classes: %s",
        len(data.train),
        len(data.val),
        ", ".join(f"{task} {len(names)}" for task, names in data.class_names.items()),
    )
    if cfg.trainer.batch_size % process.world or cfg.trainer.batch_size // process.world < 2:
        raise UserError(
            f"trainer.batch_size={cfg.trainer.batch_size} is the global batch: make it a multiple "
            f"of the {process.world} processes, with at least 2 images per process (BatchNorm needs 2)"
        )
    return data


def start_run_folder(out_dir: Path, run: Run, progress: Progress, resumed: Checkpoint | None, resume) -> None:
    """A resumed run's metrics.jsonl starts with the earlier epochs, and its checkpoints/ with the best model."""
    if run.process.is_main:
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in progress.history))
        if resumed is not None:
            carry_best_checkpoint(resumed, Path(resume), out_dir / "checkpoints")
    if resumed is not None:
        partial = progress.partial_epoch
        log.info(
            "resuming from %s at epoch %d%s",
            resume,
            progress.epoch + 1,
            f", image {partial['seen']}" if partial else "",
        )
    precision = str(run.precision or torch.float32).replace("torch.", "")
    log.info("training on %s, precision %s, output in %s", run.process.device, precision, out_dir)
    log.info("backbone %s, first weights: %s", run.model.backbone_name, run.model.pretrained_source or "random init")


def save_checkpoints(checkpoint: Checkpoint, folder: Path, epoch: int, improved: bool, interval: int) -> None:
    """last.pt and every `interval`-th epoch_NNN.pt hold the run's full state, to resume; best.pt, the best
    epoch's model only, for predict, evaluate, export, enrol and publish_to."""
    checkpoint.save([folder / "last.pt"] + [folder / f"epoch_{epoch:03d}.pt"] * (epoch % interval == 0))
    if improved:
        checkpoint.for_inference().save([folder / "best.pt"])


def check_finite(row: dict, checkpoints: Path) -> None:
    if not all(math.isfinite(row[k]) for k in ("train_loss", "val_loss")):
        raise UserError(
            f"epoch {row['epoch']}: the loss became {row['train_loss']} / {row['val_loss']}; "
            "lower the learning rate (optimizer.lr) or use trainer.precision=32. "
            + (
                f"The last good checkpoint is {checkpoints / 'last.pt'}"
                if row["epoch"] > 1
                else "No checkpoint was written."
            )
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


if __name__ == "__main__":
    main()
