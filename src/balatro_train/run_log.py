"""What a run writes as it goes: each epoch's row of metrics.jsonl, its TensorBoard entries, its line in
the log, and the run's summary at the end (the terminal's progress bars are in progress.py).

TensorBoard (`tb/`; a sweep job's in `tb/<its swept overrides>/`, e.g. `tb/optimizer=group,freeze=all/`)
holds three runs, so that a training and a validation curve of the same tag share one chart:

  .        HPARAMS: the hyper-parameters and metrics (written at the start), this run's values, its
           end status; text: `config` (the resolved config), `summary` (the best epoch, at the end)
  train    Loss/<task>, Loss/combined, lr/<group>, zz_time/*, every epoch; train_steps/loss every
           trainer.log_every_n_steps optimizer steps (its x axis: the optimizer step)
  val      Loss/<task>, Loss/combined, Loss/combined_best, Top1/<task>, <task>/<metric> (every other
           scalar metric), images <task>/confusion_matrix and <task>/misclassified, text
           <task>/confusion_summary, every epoch

TensorBoard sorts groups (a tag's first part) by character code, capitals first, and opens the first
two: `Loss` and `Top1`. The epoch is the x axis of every per-epoch tag.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2, summary_v2
from torch.utils.tensorboard import SummaryWriter

from balatro_train.errors import Interrupted
from balatro_train.metrics import (
    confusion_counts,
    confusion_figure,
    confusion_summary,
    confusion_summary_markdown,
    misclassified_grid,
    scalars_and_matrices,
    write_confusion_summaries,
)
from balatro_train.progress import TrainingProgress, progress_bar

log = logging.getLogger("balatro_train")
COMBINE = {"max": max, "mean": lambda values: sum(values) / len(values), "sum": sum}  # trainer.combine_losses
LOSS, TOP1, BEST = "Loss", "Top1", "Loss/combined_best"
SUMMARY_ROWS_IN_TENSORBOARD = 40  # the worst classes of a task's confusion summary shown each epoch


@dataclass
class HParams:
    """A run's hyper-parameters for TensorBoard's HPARAMS view: `values` (str, bool, int or float, by
    config key or group name), the keys a sweep varies (`swept`: listed first, ticked in HPARAMS), and
    the name of its folder inside tb/ ("": tb/ itself)."""

    values: dict[str, Any]
    swept: tuple[str, ...] = ()
    name: str = ""

    @classmethod
    def of(cls, cfg, hparams: HParams | dict | None) -> HParams:
        if isinstance(hparams, HParams):
            return hparams
        return cls({**main_values(cfg), **(hparams or {})})


def main_values(cfg) -> dict[str, Any]:
    """The numbers every run reports in HPARAMS, whether or not they were chosen on the command line."""
    values = {
        "seed": cfg.seed,
        "data.image_size": cfg.data.image_size,
        "trainer.batch_size": cfg.trainer.batch_size,
        "trainer.epochs": cfg.trainer.epochs,
        "trainer.precision": cfg.trainer.precision,
        "data.weighted_sampler": cfg.data.weighted_sampler,
        "data.recolour": cfg.data.recolour,
        "model.backbone": cfg.model.get("backbone"),
        "optimizer.optimizer": cfg.optimizer.get("optimizer"),
    }
    values.update({f"optimizer.{k}": v for k, v in cfg.optimizer.items() if k.startswith("lr")})
    return {k: hparam_value(v) for k, v in values.items() if v is not None}


def hparam_value(value) -> str | bool | int | float:
    """A config value as HPARAMS takes it: booleans, numbers and strings as they are, anything else
    (lists, mappings, null) as JSON text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return json.dumps(value)


class RunLog:
    """A run's TensorBoard writers and metrics.jsonl. Only the first process writes (`enabled`); the
    others get the same calls and write nothing. As a context manager it writes the HPARAMS session's
    end: success, failure, or unknown for an interrupted run (Ctrl-C, SIGTERM: it may be resumed; the
    plugin has no "aborted")."""

    def __init__(self, out_dir: Path, cfg, hparams: HParams, tasks: list[str], history: list[dict], process):
        self.out_dir, self.tasks, self.enabled, self.world = out_dir, tasks, process.is_main, process.world
        self.combine = COMBINE[cfg.trainer.combine_losses]
        self.every, self.epochs = cfg.trainer.log_every_n_steps, cfg.trainer.epochs
        self.best, self.writers = float("inf"), {}
        if not self.enabled:
            return
        root = out_dir / "tb" / hparams.name
        self.writers = {run: SummaryWriter(root / run) for run in (".", "train", "val")}
        self.session_start(hparams, cfg)
        for row in history:  # a resumed run's curves start with the earlier epochs
            self.scalars(row)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if not self.enabled:
            return
        status = (
            api_pb2.STATUS_SUCCESS
            if kind is None
            else api_pb2.STATUS_UNKNOWN
            if issubclass(kind, (Interrupted, KeyboardInterrupt))
            else api_pb2.STATUS_FAILURE
        )
        self.writers["."].file_writer.add_summary(session_end_pb(status), 0)
        for writer in self.writers.values():
            writer.close()

    # ---- the start: HPARAMS and the config --------------------------------------------------------------

    def session_start(self, hparams: HParams, cfg) -> None:
        root = self.writers["."]
        started = time.time()
        with_top1 = [task for task in self.tasks if "top1_acc" in cfg.tasks[task].metrics]
        root.file_writer.add_summary(experiment_pb(hparams, with_top1, started), 0)
        # trial_id "": HPARAMS names the trial after its run (0/tb/optimizer=group), not after a hash of its values
        root.file_writer.add_summary(summary_v2.hparams_pb(hparams.values, trial_id="", start_time_secs=started), 0)
        root.add_text("config", "```yaml\n" + OmegaConf.to_yaml(cfg, resolve=True) + "```", 0)
        root.flush()

    # ---- every epoch ----------------------------------------------------------------------------------

    def epoch(self, row: dict, validation, data, improved: bool) -> None:
        """Append the epoch to metrics.jsonl; to TensorBoard its scalars, each task's confusion matrix
        and summary, and a grid of the validation images it got wrong (under DDP, those this process
        scored: `validation.scored`); for a better epoch, confusion_summary.md / .csv in the run folder,
        and (one process) val_predictions.json."""
        with (self.out_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.scalars(row)
        val, epoch, summaries = self.writers["val"], row["epoch"], {}
        images = data.val.images[validation.scored]
        for task, task_results in validation.results.items():
            names = data.class_names[task]
            truth, predicted = data.val.targets[task][validation.scored].tolist(), validation.predictions[task].tolist()
            counts = confusion_counts(truth, predicted, len(names))
            summaries[task] = confusion_summary(counts, names)
            declared = scalars_and_matrices(task_results)[1].get("confusion_matrix")  # gathered from every process
            matrix = declared if declared is not None else counts
            val.add_figure(f"{task}/confusion_matrix", confusion_figure(matrix, names, f"{task}, epoch {epoch}"), epoch)
            grid = misclassified_grid(
                images,
                [names[i] for i in truth],
                [names[i] for i in predicted],
                16,
                validation.confidences[task].tolist(),
            )
            val.add_image(f"{task}/misclassified", grid, epoch, dataformats="HWC")
            header = (
                f"**{task}, epoch {epoch}**: {counts.sum() - np.trace(counts)} of {counts.sum()} validation "
                f"images wrong; classes by F1, worst first.\n\n"
            )
            val.add_text(
                f"{task}/confusion_summary",
                header + confusion_summary_markdown(summaries[task], SUMMARY_ROWS_IN_TENSORBOARD),
                epoch,
            )
        if improved and self.world == 1:  # every validation image's answer: one process scored them all
            write_predictions(self.out_dir / "val_predictions.json", data, validation)
        if improved:
            write_confusion_summaries(
                self.out_dir,
                summaries,
                f"best epoch {epoch}" + ("" if self.world == 1 else f", this process's 1/{self.world} of validation"),
            )
        for writer in self.writers.values():
            writer.flush()

    def scalars(self, row: dict) -> None:
        """metrics.jsonl's row as TensorBoard scalars (see the module docstring for where each goes)."""
        if not self.enabled:
            return
        train, val, epoch = self.writers["train"], self.writers["val"], row["epoch"]
        self.best = min(self.best, row["val_loss"])
        train.add_scalar(f"{LOSS}/combined", row["train_loss"], epoch)
        val.add_scalar(f"{LOSS}/combined", row["val_loss"], epoch)
        val.add_scalar(BEST, self.best, epoch)
        for key, value in row.items():
            task, _, name = key.partition("/")
            if task == "lr" and name:  # lr/<group>; "lr" alone is the heads' group again
                train.add_scalar(key, value, epoch)
            elif name == "train_loss":
                train.add_scalar(f"{LOSS}/{task}", value, epoch)
            elif name == "val_loss":
                val.add_scalar(f"{LOSS}/{task}", value, epoch)
            elif name == "top1_acc":
                val.add_scalar(f"{TOP1}/{task}", value, epoch)
            elif name:
                val.add_scalar(key, value, epoch)
        train.add_scalar("zz_time/epoch_seconds", row["epoch_seconds"], epoch)
        train.add_scalar("zz_time/train_images_per_sec", row["train_images_per_sec"], epoch)

    # ---- the terminal ---------------------------------------------------------------------------------

    def training_progress(self, epoch: int) -> TrainingProgress:
        return TrainingProgress(
            f"epoch {epoch}/{self.epochs}",
            self.combine,
            self.every,
            epoch,
            self.world,
            self.writers.get("train"),
            show=self.enabled,
        )

    def validation_bar(self, epoch: int):
        """Wraps the validation loader in a bar (on a terminal, first process only)."""
        return lambda loader: progress_bar(loader, f"validate {epoch}/{self.epochs}", show=self.enabled)

    # ---- the end --------------------------------------------------------------------------------------

    def finish(self, progress, checkpoints: Path, resumed_from) -> None:
        """The best epoch, in the log and as TensorBoard's `summary` text."""
        best_row = min(progress.history, key=lambda r: r["val_loss"])
        best = checkpoints / "best.pt"
        if best.is_file() or not self.enabled:
            log.info("best val_loss %.4f at epoch %d: %s", progress.best_val_loss, best_row["epoch"], best)
        else:
            log.warning(
                "best val_loss %.4f at epoch %d, before the resume; its checkpoint was not found beside %s, "
                "so this run has no best.pt (its last.pt is %s)",
                progress.best_val_loss,
                best_row["epoch"],
                resumed_from,
                checkpoints / "last.pt",
            )
        if self.enabled:
            self.writers["."].add_text(
                "summary",
                run_summary(progress.history, best_row, best if best.is_file() else None, self.out_dir),
                progress.history[-1]["epoch"],
            )


def run_summary(history: list[dict], best_row: dict, best: Path | None, out_dir: Path) -> str:
    lines = [
        f"**Best epoch {best_row['epoch']}** of {history[-1]['epoch']}: combined validation loss "
        f"{best_row['val_loss']:.4f}.",
        "",
        f"- checkpoint: `{best}`"
        if best
        else "- no best.pt in this run folder (the best epoch came before the resume)",
        f"- run folder: `{out_dir}`; confusion summary of the best epoch: `confusion_summary.md`",
        "",
        "| metric (best epoch) | value |",
        "|---|---:|",
    ]
    lines += [
        f"| {key} | {value:.4f} |"
        for key, value in best_row.items()
        if key != "epoch" and not key.startswith("lr") and isinstance(value, (int, float))
    ]
    return "\n".join(lines)


def write_predictions(path: Path, data, validation) -> None:
    """The best epoch's answer for every validation image it scored, {file: {task: {"true": label, "pred":
    label}}}, so that a report can break accuracy down by class, by edition or by how often a card was seen."""
    files = [data.split["val"][i] for i in validation.scored]
    rows = {file: {} for file in files}
    for task, predicted in validation.predictions.items():
        names, truth = data.class_names[task], data.val.targets[task][validation.scored]
        for file, true, pred in zip(files, truth.tolist(), predicted.tolist(), strict=True):
            rows[file][task] = {"true": names[true], "pred": names[pred]}
    path.write_text(json.dumps(rows, indent=0))


def epoch_row(
    epoch: int,
    combine_rule: str,
    train_loss_means: dict,
    validation,
    lrs: dict[str, float],
    started: float,
    images_per_sec: float,
) -> dict:
    """metrics.jsonl's row: the combined losses, learning rates and timing (the epoch `started` at this
    time.perf_counter()), then per task its losses and every scalar metric (matrices are figures, not numbers)."""
    combine, val_losses, results = COMBINE[combine_rule], validation.losses, validation.results
    seconds = time.perf_counter() - started
    with warnings.catch_warnings():  # an epoch resumed after its last step has restored sums and no update
        warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric MeanMetric was called before")
        train_losses = {task: mean.compute().item() for task, mean in train_loss_means.items()}
    row = {
        "epoch": epoch,
        "train_loss": combine(list(train_losses.values())),
        "val_loss": combine(list(val_losses.values())),
        "lr": list(lrs.values())[-1],
        **{f"lr/{name}": value for name, value in lrs.items()},
        "epoch_seconds": round(seconds, 3),
        "train_images_per_sec": round(images_per_sec, 2),
    }
    for task in train_losses:
        row[f"{task}/train_loss"], row[f"{task}/val_loss"] = train_losses[task], val_losses[task]
        row.update({f"{task}/{name}": value for name, value in scalars_and_matrices(results[task])[0].items()})
    return row


def log_epoch(row: dict, epochs: int, improved: bool, tasks: list[str]) -> None:
    log.info(
        "epoch %d/%d  train_loss %.4f  val_loss %.4f%s  %s  lr %.2e  %.1fs  %.0f img/s",
        row["epoch"],
        epochs,
        row["train_loss"],
        row["val_loss"],
        " *" if improved else "",
        "  ".join(f"{t}/top1 {row[f'{t}/top1_acc']:.3f}" for t in tasks if f"{t}/top1_acc" in row),
        row["lr"],
        row["epoch_seconds"],
        row["train_images_per_sec"],
    )


# ---- HPARAMS' summaries, without TensorFlow ----------------------------------------------------------------


def experiment_pb(hparams: HParams, tasks: list[str], started: float):
    """The HPARAMS experiment, as summary_v2.hparams_config_pb writes it, with each hyper-parameter's type
    and whether the sweep varies it (`differs`: TensorBoard lists and ticks those first), and no domain
    (one job's values alone would filter the other jobs out). Its metrics are tags of the `val` run,
    written every epoch, so running, interrupted and failed runs show their numbers too."""

    def dtype(value):
        return (
            api_pb2.DATA_TYPE_BOOL
            if isinstance(value, bool)
            else api_pb2.DATA_TYPE_FLOAT64
            if isinstance(value, (int, float))
            else api_pb2.DATA_TYPE_STRING
        )

    swept = [k for k in hparams.swept if k in hparams.values]
    order = swept + sorted(k for k in hparams.values if k not in swept)
    infos = [api_pb2.HParamInfo(name=k, type=dtype(hparams.values[k]), differs=k in swept) for k in order]
    metrics = [
        summary_v2.Metric(
            BEST, group="val", display_name="best val loss", dataset_type=summary_v2.Metric.VALIDATION
        ).as_proto()
    ]
    metrics += [
        summary_v2.Metric(
            f"{TOP1}/{task}", group="val", display_name=f"{task} top-1", dataset_type=summary_v2.Metric.VALIDATION
        ).as_proto()
        for task in tasks
    ]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics, time_created_secs=started)
    return hparams_summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))


def session_end_pb(status):
    end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    return hparams_summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))


def hparams_summary(tag: str, plugin_data):
    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(plugin_data), tensor=metadata.NULL_TENSOR)
    return summary
