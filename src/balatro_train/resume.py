"""How a run goes on where it stopped: an interrupt saves the epoch so far (`interrupt`), and `resume=`
restores the optimizer, scheduler, scaler, RNGs and progress (`restore`), the interrupted epoch's
loss sums (`resume_epoch`) and the best model so far (`carry_best_checkpoint`)."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import torch
import torch.distributed as dist
from torchmetrics import MeanMetric

from balatro_train.checkpoint import Progress, copy_file_atomically, load_checkpoint, restore_rng_state, save_checkpoint
from balatro_train.errors import Interrupted, UserError
from balatro_train.metrics import new_loss_means

log = logging.getLogger("balatro_train")


def restore(resumed: dict, optimizer, scheduler, scaler, path) -> Progress:
    optimizer.load_state_dict(resumed["optimizer"])
    scheduler.load_state_dict(resumed["scheduler"])
    scaler.load_state_dict(resumed["scaler"])
    restore_rng_state(resumed["rng"])
    progress = Progress.of(resumed)
    partial = progress.partial_epoch
    log.info("resuming from %s at epoch %d%s", path, progress.epoch + 1,
             f", image {partial['seen']}" if partial else "")
    return progress


def resume_epoch(progress: Progress, loss_fns, device) -> tuple[int, dict[str, MeanMetric]]:
    """Where an epoch starts: image 0 with empty means, or where an interrupt stopped it. The saved
    sums are every process's, so only the first process starts from them."""
    loss_means = new_loss_means(loss_fns, device)
    partial, progress.partial_epoch = progress.partial_epoch, None
    if partial is None:
        return 0, loss_means
    if not dist.is_initialized() or dist.get_rank() == 0:
        for task, (total, count) in partial["loss_sums"].items():
            loss_means[task].mean_value, loss_means[task].weight = total.to(device), count.to(device)
    return partial["seen"], loss_means


def interrupt(progress: Progress, epoch: int, seen: int, loss_means, checkpoint, process, out_dir: Path):
    """Save the interrupted epoch as last.pt (with every process's loss sums) and stop the run."""
    sums = {task: torch.stack([mean.mean_value, mean.weight]) for task, mean in loss_means.items()}
    if process.world > 1:
        for total in sums.values():
            dist.all_reduce(total)
    progress.partial_epoch = {"seen": seen, "loss_sums": {task: list(total.cpu()) for task, total in sums.items()}}
    last = out_dir / "checkpoints" / "last.pt"
    if process.is_main:
        save_checkpoint(checkpoint(), [last])
    command = shlex.join(["python", "-m", "balatro_train", "--config-dir", str(out_dir / ".hydra"),
                          "--config-name", "config", f"resume={last}"])
    raise Interrupted(f"interrupted in epoch {epoch} after {seen} images; to resume: {command}")


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
        try:
            state = resumed if candidate == resumed_from else load_checkpoint(candidate, "resume")
        except UserError:  # a damaged best.pt beside a good last.pt: the resume goes on without it
            log.warning("%s, beside %s, is damaged or not a checkpoint: the resume goes on without it",
                        candidate, resumed_from)
            continue
        if (state["epoch"], state["partial_epoch"], state["best_val_loss"]) == (best_epoch, None,
                                                                              resumed["best_val_loss"]):
            copy_file_atomically(candidate, checkpoints / "best.pt")
            log.info("best model so far (epoch %d) copied from %s", best_epoch, candidate)
            return
    log.warning("the best model so far (epoch %d) is not beside %s; best.pt will be written when an epoch of "
                "this run improves on it", best_epoch, resumed_from)
