"""What a run writes as it goes: each epoch's row of metrics.jsonl, its TensorBoard entries and its
line in the log, and the run's summary at the end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from balatro_train.metrics import confusion_figure, misclassified_grid, scalars_and_matrices

log = logging.getLogger("balatro_train")
COMBINE = {"max": max, "mean": lambda values: sum(values) / len(values), "sum": sum}  # trainer.combine_losses


def epoch_row(epoch: int, combine_rule: str, train_loss_means: dict, val_losses: dict[str, float],
              results: dict[str, dict[str, torch.Tensor]], lrs: dict[str, float], seconds: float,
              images_per_sec: float) -> dict:
    """metrics.jsonl's row: the combined losses, learning rates and timing, then per task its losses and
    every scalar metric (matrices are figures, not numbers)."""
    combine = COMBINE[combine_rule]
    train_losses = {task: mean.compute().item() for task, mean in train_loss_means.items()}
    row = {"epoch": epoch, "train_loss": combine(list(train_losses.values())),
           "val_loss": combine(list(val_losses.values())), "lr": list(lrs.values())[-1],
           **{f"lr/{name}": value for name, value in lrs.items()},
           "epoch_seconds": round(seconds, 3), "train_images_per_sec": round(images_per_sec, 2)}
    for task in train_losses:
        row[f"{task}/train_loss"], row[f"{task}/val_loss"] = train_losses[task], val_losses[task]
        row.update({f"{task}/{name}": value for name, value in scalars_and_matrices(results[task])[0].items()})
    return row


def write_epoch(row: dict, results: dict, data, predictions: dict, world: int, metrics_file: Path, writer) -> None:
    """Append the epoch to metrics.jsonl and TensorBoard: scalars, matrices as figures, and a grid of
    the validation images each task got wrong (this process's share of them, under DDP)."""
    with metrics_file.open("a") as f:
        f.write(json.dumps(row) + "\n")
    epoch = row["epoch"]
    for key, value in row.items():
        if key != "epoch":
            writer.add_scalar(key, value, epoch)
    for task, task_results in results.items():
        names = data.class_names[task]
        for name, matrix in scalars_and_matrices(task_results)[1].items():
            writer.add_figure(f"{task}/{name}", confusion_figure(matrix, names, f"{task} {name}, epoch {epoch}"), epoch)
        truth = [names[i] for i in data.val.targets[task][::world].tolist()]
        grid = misclassified_grid(data.val.images[::world], truth, [names[i] for i in predictions[task].tolist()])
        writer.add_image(f"{task}/misclassified", grid, epoch, dataformats="HWC")


def write_predictions(path: Path, data, predictions: dict[str, torch.Tensor]) -> None:
    """The best epoch's answer for every validation image, {file: {task: {"true": label, "pred": label}}},
    so that a report can break accuracy down by class, by edition or by how often a card was seen."""
    rows = {file: {} for file in data.split["val"]}
    for task, predicted in predictions.items():
        names = data.class_names[task]
        for file, true, pred in zip(data.split["val"], data.val.targets[task].tolist(), predicted.tolist()):
            rows[file][task] = {"true": names[true], "pred": names[pred]}
    path.write_text(json.dumps(rows, indent=0))


def log_epoch(row: dict, epochs: int, improved: bool, tasks: list[str]) -> None:
    log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f%s  %s  lr %.2e  %.1fs  %.0f img/s",
             row["epoch"], epochs, row["train_loss"], row["val_loss"], " *" if improved else "",
             "  ".join(f"{t}/top1 {row[f'{t}/top1_acc']:.3f}" for t in tasks if f"{t}/top1_acc" in row),
             row["lr"], row["epoch_seconds"], row["train_images_per_sec"])


def finish(progress: Progress, writer, hparams: dict, checkpoints: Path, resumed_from, process) -> None:
    """The best epoch, in TensorBoard's HPARAMS view and in the log."""
    best_row = min(progress.history, key=lambda r: r["val_loss"])
    if process.is_main:
        writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in best_row.items()
                                     if k.endswith(("val_loss", "top1_acc"))}, run_name=".")
    if (checkpoints / "best.pt").is_file() or not process.is_main:
        log.info("best val_loss %.4f at epoch %d: %s", progress.best_val_loss, best_row["epoch"],
                 checkpoints / "best.pt")
    else:
        log.warning("best val_loss %.4f at epoch %d, before the resume; its checkpoint was not found beside %s, "
                    "so this run has no best.pt (its last.pt is %s)", progress.best_val_loss, best_row["epoch"],
                    resumed_from, checkpoints / "last.pt")
