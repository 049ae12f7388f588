"""The training run: `python -m balatro_train` (or `balatro-train`) with Hydra overrides.

Read top to bottom: `main` -> `train` (set-up, then the epoch loop) -> `train_one_epoch` and
`validate`. Everything configurable is built from `conf/` with `hydra.utils.instantiate`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shlex
import threading
import time
import warnings
from pathlib import Path

import albumentations as A
import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from balatro_train import config  # noqa: F401  (registers the structured config)
from balatro_train.checkpoint import (copy_file_atomically, load_checkpoint, restore_rng_state, rng_state,
                                      save_checkpoint)
from balatro_train.config import CONFIG_DIR, check_config, typed_config
from balatro_train.device import resolve_device, resolve_precision
from balatro_train.data import EpochSampler, balanced_weights, build_data
from balatro_train.errors import Interrupted, UserError
from balatro_train.job import run_hydra_job
from balatro_train.metrics import build_metrics, confusion_figure, misclassified_grid, split_results
from balatro_train.model import keep_frozen_batchnorm_in_eval, parameter_groups

log = logging.getLogger("balatro_train")
# conf/hydra/launcher/{joblib,submitit_slurm}.yaml complete the plugins' configs of the same name
# on purpose; Hydra would warn about that at every composition.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema",
                        category=UserWarning)
# A run resumed from an interrupt after an epoch's last step has no step left in that epoch, so its
# scheduler steps without an optimizer step in between: exactly what the uninterrupted run did.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`",
                        category=UserWarning)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra's task function: `train` inside the job plumbing (balatro_train/job.py); returns the
    best combined validation loss, for sweepers."""
    return run_hydra_job(cfg, train)


def train(cfg: DictConfig, out_dir: Path, stop: threading.Event | None = None, hparams: dict | None = None) -> float:
    """Train as `cfg` says, writing the run folder `out_dir`; returns the best combined validation loss.

    Needs no Hydra runtime: `cfg` is a composed config (the CLI's, or `hydra.compose(...)` in tests).
    Setting `stop` (the CLI sets it on Ctrl-C) ends the run at the next step with a resumable last.pt.
    """
    cfg = typed_config(cfg)
    check_config(cfg)
    stop = stop or threading.Event()
    seed_everything(cfg.seed)
    rank, world, device = start_distributed(cfg.trainer.device)
    is_main = rank == 0  # only the first process writes files; all of them train
    if cfg.trainer.batch_size % world or cfg.trainer.batch_size // world < 2:
        raise UserError(f"trainer.batch_size={cfg.trainer.batch_size} is the global batch: make it a multiple "
                        f"of the {world} processes, with at least 2 images per process (BatchNorm needs 2)")
    amp_dtype = resolve_precision(cfg.trainer.precision, device)

    # A resumed run continues with its own split, class indices and state; init_from takes
    # only the weights (and the class names, so that label indices keep their meaning).
    resumed = load_checkpoint(cfg.resume, "resume") if cfg.resume else None
    init = load_checkpoint(cfg.init_from, "init_from") if cfg.init_from else None
    source = resumed or init
    if source is not None:
        check_same_tasks(source, cfg, "resume" if resumed else "init_from")

    if cfg.dataset.render is not None:
        instantiate(cfg.dataset.render)
    data = build_data(cfg, source and source["class_names"], resumed and resumed["split"])
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "split.json").write_text(json.dumps(data.split, indent=1))
    if data.skipped and is_main:
        (out_dir / "skipped_images.json").write_text(json.dumps(data.skipped, indent=1))
    log.info("data: %d training and %d validation images; classes: %s", len(data.train), len(data.val),
             ", ".join(f"{task} {len(names)}" for task, names in data.class_names.items()))

    model = instantiate(cfg.model, num_classes={t: len(n) for t, n in data.class_names.items()})
    if source is not None:
        model.load_state_dict(source["model"])
    instantiate(cfg.freeze)(model)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    # torch.compile wraps the same parameters; checkpoints keep saving the plain model's keys.
    step_model = DistributedDataParallel(model) if world > 1 else model
    step_model = torch.compile(step_model) if cfg.trainer.compile else step_model
    # Validation shards are uneven, so it runs on the plain model: DDP's forward would wait for the others.
    eval_model = (torch.compile(model) if cfg.trainer.compile else model) if world > 1 else step_model

    optimizer_cfg = OmegaConf.to_container(cfg.optimizer)
    groups = parameter_groups(model, optimizer_cfg.pop("lr_backbone", None), optimizer_cfg.pop("lr_heads", None))
    optimizer = instantiate(optimizer_cfg)(groups)
    scheduler = instantiate(cfg.scheduler)(optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fns = {task: nn.CrossEntropyLoss(weight=class_weights(task, cfg.tasks[task], names)).to(device)
                for task, names in data.class_names.items()}
    metrics = {task: build_metrics(task, cfg.tasks[task].metrics, len(names)).to(device)
               for task, names in data.class_names.items()}

    train_loader, val_loader = make_loaders(cfg, data, device, rank, world)
    start_epoch, best_loss, bad_epochs, history = 1, math.inf, 0, []
    partial = None  # an epoch that an interrupt stopped part-way: {"seen": ..., "totals": ...}
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        restore_rng_state(resumed["rng"])
        start_epoch, best_loss = resumed["epoch"] + 1, resumed["best_val_loss"]
        bad_epochs, history, partial = resumed["bad_epochs"], resumed["history"], resumed["partial_epoch"]
        log.info("resuming from %s at epoch %d%s", cfg.resume, start_epoch,
                 f", image {partial['seen']}" if partial else "")

    metrics_file = out_dir / "metrics.jsonl"
    if is_main:
        metrics_file.write_text("".join(json.dumps(row) + "\n" for row in history))
    checkpoints = out_dir / "checkpoints"
    if resumed is not None and is_main:
        carry_best_checkpoint(resumed, Path(cfg.resume), checkpoints)
    # closed even when a sweep job fails
    with SummaryWriter(out_dir / "tb") if is_main else contextlib.nullcontext() as writer:
        log.info("training on %s, precision %s, %s", device, str(amp_dtype or torch.float32).replace("torch.", ""),
                 f"output in {out_dir}")

        # What inference needs to prepare an image exactly as validation did.
        preprocessing = {"image_size": cfg.data.image_size, "background": list(cfg.data.background),
                         "val_transforms": A.to_dict(data.val.pipeline)}

        def checkpoint_state(epoch: int, partial_epoch: dict | None = None) -> dict:
            return {"epoch": epoch, "partial_epoch": partial_epoch, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "best_val_loss": best_loss, "bad_epochs": bad_epochs,
                    "history": history, "rng": rng_state(), "class_names": data.class_names,
                    "fields": {t: cfg.tasks[t].field for t in cfg.tasks}, "split": data.split,
                    "pretrained_loaded": model.pretrained_loaded, "config": OmegaConf.to_container(cfg, resolve=True),
                    "preprocessing": preprocessing}

        for epoch in range(start_epoch, cfg.trainer.epochs + 1):
            started = time.perf_counter()
            lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
            lr = optimizer.param_groups[-1]["lr"]
            totals = {task: torch.zeros((), device=device) for task in loss_fns}
            seen = 0
            if partial is not None:
                totals, seen, partial = {t: v.to(device) for t, v in partial["totals"].items()}, partial["seen"], None
            train_loader.sampler.set_epoch(epoch, start=seen)
            seen = train_one_epoch(step_model, train_loader, optimizer, scaler, loss_fns, device, amp_dtype, memory_format,
                                   totals, seen, stop, desc=f"epoch {epoch}/{cfg.trainer.epochs}")
            if stop.is_set():
                if is_main:
                    save_checkpoint(checkpoint_state(epoch - 1, {"seen": seen, "totals": totals}),
                                    [checkpoints / "last.pt"])
                command = shlex.join(["python", "-m", "balatro_train", "--config-dir", str(out_dir / ".hydra"),
                                      "--config-name", "config", f"resume={checkpoints / 'last.pt'}"])
                raise Interrupted(f"interrupted in epoch {epoch} after {seen} images; to resume: {command}")
            train_seconds = time.perf_counter() - started
            train_losses = mean_over_processes(totals, seen, world)
            val_losses, results, predictions = validate(eval_model, val_loader, loss_fns, metrics, device, amp_dtype,
                                                        memory_format, world)
            seconds = time.perf_counter() - started

            combine = {"max": max, "mean": lambda v: sum(v) / len(v), "sum": sum}[cfg.trainer.combine_losses]
            val_loss = combine(list(val_losses.values()))
            row = {"epoch": epoch, "train_loss": combine(list(train_losses.values())), "val_loss": val_loss,
                   "lr": lr, **{f"lr/{name}": value for name, value in lrs.items()},
                   "epoch_seconds": round(seconds, 3),
                   "train_images_per_sec": round(seen * world / train_seconds, 2)}
            matrices = {}
            for task in loss_fns:
                scalars, matrices[task] = split_results(results[task])
                row[f"{task}/train_loss"], row[f"{task}/val_loss"] = train_losses[task], val_losses[task]
                row.update({f"{task}/{name}": value for name, value in scalars.items()})
            if not all(math.isfinite(row[k]) for k in ("train_loss", "val_loss")):
                raise UserError(f"epoch {epoch}: the loss became {row['train_loss']} / {row['val_loss']}; "
                                "lower the learning rate (optimizer.lr) or use trainer.precision=32. "
                                + (f"The last good checkpoint is {checkpoints / 'last.pt'}" if epoch > 1
                                   else "No checkpoint was written."))

            improved = val_loss < best_loss
            best_loss, bad_epochs = (val_loss, 0) if improved else (best_loss, bad_epochs + 1)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val_loss)
            else:
                scheduler.step()
            history.append(row)
            if is_main:
                write_epoch(row, matrices, data, predictions, world, metrics_file, writer)
                paths = [checkpoints / "last.pt"]
                paths += [checkpoints / "best.pt"] if improved else []
                paths += [checkpoints / f"epoch_{epoch:03d}.pt"] if epoch % cfg.trainer.checkpoint_interval == 0 else []
                save_checkpoint(checkpoint_state(epoch), paths)
            log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f%s  %s  lr %.2e  %.1fs  %.0f img/s",
                     epoch, cfg.trainer.epochs, row["train_loss"], val_loss, " *" if improved else "",
                     "  ".join(f"{t}/top1 {row[f'{t}/top1_acc']:.3f}" for t in loss_fns if f"{t}/top1_acc" in row),
                     lr, seconds, row["train_images_per_sec"])
            if cfg.trainer.patience and bad_epochs >= cfg.trainer.patience:
                log.info("early stop: val_loss has not improved for %d epochs", bad_epochs)
                break

        best_row = min(history, key=lambda r: r["val_loss"])
        if is_main:
            writer.add_hparams(hparams or {"seed": cfg.seed}, {f"hparam/{k}": v for k, v in best_row.items()
                                                               if k.endswith(("val_loss", "top1_acc"))}, run_name=".")
    if (checkpoints / "best.pt").is_file() or not is_main:
        log.info("best val_loss %.4f at epoch %d: %s", best_loss, best_row["epoch"], checkpoints / "best.pt")
    else:
        log.warning("best val_loss %.4f at epoch %d, before the resume; its checkpoint was not found beside %s, "
                    "so this run has no best.pt (its last.pt is %s)", best_loss, best_row["epoch"], cfg.resume,
                    checkpoints / "last.pt")
    return best_loss


def train_one_epoch(model, loader, optimizer, scaler, loss_fns, device, amp_dtype, memory_format, totals, seen,
                    stop, desc) -> int:
    """Train on the loader's batches, adding each task's summed loss to `totals` (on the device:
    reading a loss back every step would stall it). Starts at image `seen` of the epoch (after
    an interrupt), stops early once `stop` is set, and returns how many images it has seen."""
    model.train()
    keep_frozen_batchnorm_in_eval(model)
    done = seen // loader.batch_size
    bar = tqdm(loader, desc=desc, leave=False, disable=None, initial=done, total=done + len(loader))
    for step, (images, targets) in enumerate(bar):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(images)
            losses = {task: fn(outputs[task].float(), targets[task].to(device, non_blocking=True))
                      for task, fn in loss_fns.items()}
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
        for task, loss in losses.items():
            totals[task] += loss.detach() * len(images)
        seen += len(images)
        if step % 25 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{sum(totals.values()).item() / seen:.4f}")
        if stop_everywhere(stop, device):
            break
    return seen


@torch.no_grad()
def validate(model, loader, loss_fns, metrics, device, amp_dtype, memory_format, world=1):
    """One pass over the validation data gives every task's loss and metrics."""
    model.eval()
    totals = {task: torch.zeros((), device=device) for task in loss_fns}
    seen = 0
    predictions = {task: [] for task in loss_fns}
    for metric in metrics.values():
        metric.reset()
    for images, targets in loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(images)
        for task, fn in loss_fns.items():
            logits, target = outputs[task].float(), targets[task].to(device, non_blocking=True)
            totals[task] += fn(logits, target) * len(images)
            metrics[task].update(logits, target)
            predictions[task].append(logits.argmax(dim=1))
        seen += len(images)
    # torchmetrics gathers its states from every process in compute(); predictions stay this process's
    return (mean_over_processes(totals, seen, world), {task: metric.compute() for task, metric in metrics.items()},
            {task: torch.cat(p).cpu() for task, p in predictions.items()})


def write_epoch(row: dict, matrices: dict, data, predictions: dict, world: int, metrics_file: Path,
                writer: SummaryWriter) -> None:
    """Append the epoch to metrics.jsonl and TensorBoard: scalars, matrices as figures, and a grid of
    the validation images each task got wrong (this process's share of them, under DDP)."""
    class_names = data.class_names
    with metrics_file.open("a") as f:
        f.write(json.dumps(row) + "\n")
    epoch = row["epoch"]
    for key, value in row.items():
        if key != "epoch":
            writer.add_scalar(key, value, epoch)
    for task, task_matrices in matrices.items():
        for name, matrix in task_matrices.items():
            writer.add_figure(f"{task}/{name}", confusion_figure(matrix, class_names[task],
                                                                 f"{task} {name}, epoch {epoch}"), epoch)
    for task, predicted in predictions.items():
        names = class_names[task]
        truth = [names[i] for i in data.val.targets[task][::world].tolist()]
        grid = misclassified_grid(data.val.images[::world], truth, [names[i] for i in predicted.tolist()])
        writer.add_image(f"{task}/misclassified", grid, epoch, dataformats="HWC")


def mean_over_processes(totals: dict[str, torch.Tensor], seen: int, world: int) -> dict[str, float]:
    """Per-task mean loss over every image every process has seen (one read-back per epoch)."""
    values = torch.stack([*totals.values(), torch.tensor(float(seen), device=next(iter(totals.values())).device)])
    if world > 1:
        dist.all_reduce(values)
    return {task: (value / values[-1]).item() for task, value in zip(totals, values)}


def stop_everywhere(stop: threading.Event, device: torch.device) -> bool:
    """Whether any process was asked to stop: under DDP all must leave the epoch at the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return stop.is_set()
    flag = torch.tensor(1.0 if stop.is_set() else 0.0, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        stop.set()
    return stop.is_set()


def start_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    NCCL with one GPU per process, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if rank != 0:  # one voice in the log
        logging.getLogger("balatro_train").setLevel(logging.WARNING)
    log.info("distributed: %d processes, backend %s, %d CPU threads per process", world, backend,
             torch.get_num_threads())
    return rank, world, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def make_loaders(cfg, data, device, rank: int = 0, world: int = 1) -> tuple[DataLoader, DataLoader]:
    """trainer.batch_size is the global batch: each of `world` processes loads its share."""
    workers = cfg.trainer.num_workers
    if workers == "auto":  # worker processes pay off only when cores are left beside the model's threads
        threads = torch.get_num_threads()
        workers = 0 if threads <= 2 else min(8, threads // 2)
    workers = int(workers)
    weights = balanced_weights(data.train_labels) if cfg.data.weighted_sampler else None
    common = dict(batch_size=cfg.trainer.batch_size // world, num_workers=workers, persistent_workers=workers > 0,
                  pin_memory=device.type == "cuda")
    # A last batch of one image would stop BatchNorm ("expected more than 1 value per channel"): drop it.
    lonely_last = math.ceil(len(data.train) / world) % common["batch_size"] == 1
    train_loader = DataLoader(data.train, sampler=EpochSampler(len(data.train), cfg.seed, weights, rank, world),
                              drop_last=lonely_last, **common)
    return train_loader, DataLoader(Subset(data.val, range(rank, len(data.val), world)), **common)


def class_weights(task: str, task_cfg, names: list[str]) -> torch.Tensor | None:
    """Loss weights given by class name in the task YAML; classes not named weigh 1."""
    if not task_cfg.class_weights:
        return None
    unknown = sorted(set(task_cfg.class_weights) - set(names))
    if unknown:
        raise UserError(f"tasks.{task}.class_weights names unknown classes {unknown} "
                        f"(known: {', '.join(names[:20])})")
    return torch.tensor([float(task_cfg.class_weights.get(name, 1.0)) for name in names])


def check_same_tasks(checkpoint: dict, cfg, key: str) -> None:
    fields = {task: t.field for task, t in cfg.tasks.items()}
    if checkpoint["fields"] != fields:
        raise UserError(f"{key}={getattr(cfg, key)}: the checkpoint was trained for tasks {checkpoint['fields']}, "
                        f"this run has {fields}; pick the same task=...")


def carry_best_checkpoint(resumed: dict, resumed_from: Path, checkpoints: Path) -> None:
    """A resumed run starts its folder with the best model so far, found beside the checkpoint it
    resumes from, so that it has a best.pt even when no later epoch beats it."""
    if not resumed["history"]:
        return
    best_epoch = min(resumed["history"], key=lambda r: r["val_loss"])["epoch"]
    for candidate in (resumed_from.parent / "best.pt", resumed_from.parent / f"epoch_{best_epoch:03d}.pt",
                      resumed_from):
        if not candidate.is_file():
            continue
        state = resumed if candidate == resumed_from else load_checkpoint(candidate, "resume")
        if (state["epoch"], state["partial_epoch"], state["best_val_loss"]) == (best_epoch, None,
                                                                              resumed["best_val_loss"]):
            copy_file_atomically(candidate, checkpoints / "best.pt")
            log.info("best model so far (epoch %d) copied from %s", best_epoch, candidate)
            return
    log.warning("the best model so far (epoch %d) is not beside %s; best.pt will be written when an epoch of "
                "this run improves on it", best_epoch, resumed_from)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


if __name__ == "__main__":
    main()
