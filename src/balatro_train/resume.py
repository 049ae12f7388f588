"""How a run goes on where it stopped: what a resume may change (`check_compatible`), where an epoch
starts (`resume_epoch`), how an interrupt saves the epoch so far (`interrupt`), and the best model so far
carried into the resumed run's folder (`carry_best_checkpoint`). The restored state itself is the
checkpoint's (`Checkpoint.restore`)."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torchmetrics import MeanMetric

from balatro_train.atomic import copy_file_atomically
from balatro_train.checkpoint import Checkpoint, Progress, load_checkpoint
from balatro_train.errors import Interrupted, UserError
from balatro_train.metrics import new_loss_means
from balatro_train.model import head_configs

log = logging.getLogger("balatro_train")

# What a resume may change: how long and where the run goes on, and where its data lies now. Any other
# change would silently not apply (the optimizer's restored lr) or not fit what is restored (a new
# freeze, another scheduler): those start a new stage with init_from.
MAY_CHANGE_ON_RESUME = (
    "resume",
    "init_from",
    "publish_to",
    "trainer.epochs",
    "trainer.patience",
    "trainer.device",
    "trainer.num_workers",
    "trainer.log_every_n_steps",
    "trainer.checkpoint_interval",
    "trainer.compile",
    "dataset.labels_file",
    "dataset.augmented_labels_files",
    "dataset.root",
)
NOT_SET = "(not set)"


def check_compatible(checkpoint: Checkpoint, cfg, key: str) -> None:
    """A checkpoint whose weights start this run (resume, init_from) has its tasks and its model; one that
    is resumed also has the run's settings, apart from MAY_CHANGE_ON_RESUME."""
    given, current = getattr(cfg, key), OmegaConf.to_container(cfg, resolve=True)
    fields = {task: t.field for task, t in cfg.tasks.items()}
    if checkpoint.fields != fields:
        raise UserError(
            f"{key}={given}: the checkpoint was trained for tasks {checkpoint.fields}, "
            f"this run has {fields}; pick the same task=..."
        )
    saved_heads, these_heads = head_configs(checkpoint.config), head_configs(current)
    if saved_heads != these_heads:
        raise UserError(
            f"{key}={given}: the checkpoint's task heads are {saved_heads}, this run asks for "
            f"{these_heads}; pick the same tasks.<task>.head (and heads.* keys)"
        )
    initial = ("pretrained", "weights")  # where the first weights came from: the checkpoint's replace them
    saved_model = {k: v for k, v in checkpoint.model_config.items() if k not in initial}
    this_model = {k: v for k, v in current["model"].items() if k not in initial}
    if saved_model != this_model:
        raise UserError(
            f"{key}={given}: the checkpoint holds a {saved_model} model, this run asks "
            f"for {this_model}; pick the same model=... (and model.* keys)"
        )
    difference = key == "resume" and first_difference(checkpoint.config, current)
    if difference:
        name, old, new = difference
        # e.g. scheduler.epochs: ${trainer.epochs}, which a resume may change, but the restored scheduler would not
        given_as = flat(OmegaConf.to_container(cfg, resolve=False)).get(name)
        follows = f" (it follows {given_as})" if isinstance(given_as, str) and "${" in given_as else ""
        raise UserError(
            f"resume={cfg.resume}: {name} is {new} here but {old} in the run it resumes{follows}; a resume "
            f"goes on with that run's settings (its optimizer and scheduler state too): drop the change, "
            f"or start a new stage from its weights with init_from={cfg.resume}"
        )


def first_difference(saved: dict, current: dict, ignore=MAY_CHANGE_ON_RESUME) -> tuple[str, object, object] | None:
    """The first dotted key whose value differs between two resolved run configs, with (saved, current)
    values; keys under `ignore` are skipped. None when they agree."""
    flat_saved, flat_current = flat(saved), flat(current)
    for key in [*flat_current, *(k for k in flat_saved if k not in flat_current)]:
        if any(key == skip or key.startswith(skip + ".") for skip in ignore):
            continue
        old, new = flat_saved.get(key, NOT_SET), flat_current.get(key, NOT_SET)
        if old != new:
            return key, old, new
    return None


def flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_epoch(progress: Progress, loss_fns, process) -> tuple[int, dict[str, MeanMetric]]:
    """Where an epoch starts: image 0 with empty means, or where an interrupt stopped it. The saved
    sums are every process's, so only the first process starts from them."""
    loss_means = new_loss_means(loss_fns, process.device)
    partial, progress.partial_epoch = progress.partial_epoch, None
    if partial is None:
        return 0, loss_means
    if process.is_main:
        for task, (total, count) in partial["loss_sums"].items():
            loss_means[task].mean_value, loss_means[task].weight = total.to(process.device), count.to(process.device)
    return partial["seen"], loss_means


def interrupt(progress: Progress, epoch: int, seen: int, loss_means, checkpoint, process, out_dir: Path):
    """Save the interrupted epoch as last.pt (with every process's loss sums) and stop the run."""
    sums = {task: torch.stack([mean.mean_value, mean.weight]) for task, mean in loss_means.items()}
    process.sum(list(sums.values()))
    progress.partial_epoch = {"seen": seen, "loss_sums": {task: list(total.cpu()) for task, total in sums.items()}}
    last = out_dir / "checkpoints" / "last.pt"
    if process.is_main:
        checkpoint().save([last])
    command = shlex.join(
        [
            "python",
            "-m",
            "balatro_train",
            "--config-dir",
            str(out_dir / ".hydra"),
            "--config-name",
            "config",
            f"resume={last}",
        ]
    )
    raise Interrupted(f"interrupted in epoch {epoch} after {seen} images; to resume: {command}")


def carry_best_checkpoint(resumed: Checkpoint, resumed_from: Path, checkpoints: Path) -> None:
    """A resumed run starts its folder with the best model so far, found beside the checkpoint it
    resumes from, so that it has a best.pt even when no later epoch beats it."""
    best_epoch = resumed.progress.best_epoch
    if best_epoch is None:
        return
    for candidate in (
        resumed_from.parent / "best.pt",
        resumed_from.parent / f"epoch_{best_epoch:03d}.pt",
        resumed_from,
    ):
        if not candidate.is_file():
            continue
        try:
            state = resumed if candidate == resumed_from else load_checkpoint(candidate, "resume", resuming=False)
        except UserError:  # a damaged best.pt beside a good last.pt: the resume goes on without it
            log.warning(
                "%s, beside %s, is damaged or not a checkpoint: the resume goes on without it", candidate, resumed_from
            )
            continue
        found = state.progress
        if (found.epoch, found.partial_epoch, found.best_val_loss) == (
            best_epoch,
            None,
            resumed.progress.best_val_loss,
        ):
            if candidate.name == "best.pt":
                copy_file_atomically(candidate, checkpoints / "best.pt")
            else:  # a training checkpoint of the best epoch: its model, as a best.pt holds it
                state.for_inference().save([checkpoints / "best.pt"])
            log.info("best model so far (epoch %d) copied from %s", best_epoch, candidate)
            return
    log.warning(
        "the best model so far (epoch %d) is not beside %s; best.pt will be written when an epoch of "
        "this run improves on it",
        best_epoch,
        resumed_from,
    )
