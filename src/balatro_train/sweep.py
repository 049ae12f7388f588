"""Sweep tooling: a summary of every multirun, and the glue that keeps sweepers going past failed jobs.

`SweepSummary` is a Hydra callback, registered in `conf/train.yaml` under `hydra.callbacks`, so
it is on for every run. It does four things:

* at the end of a multirun (`on_multirun_end`, in the process that started the sweep, whatever
  the launcher; for a sweep that did not get to its end, when that process exits) it reads every
  job folder under `hydra.sweep.dir` and writes `summary.csv` and `summary.md` there: one row per
  job with its overrides, status (ok / failed), best epoch, best validation loss and each task's
  top-1 accuracy at that epoch, best first, failed jobs last;
* after each job (`on_job_end`, in the process that ran the job) it hands a job that failed to
  the Optuna sweeper as a failed trial: the runner reports a failed sweep job by returning NaN
  (its error is in the job's `error.txt`), which optuna<3 refuses with an error that ends the
  whole search;
* after each job it also gives the job's cached GPU memory back and resets the peak-memory
  statistics, so that the next job run by the same process (a sequential sweep, a joblib
  worker), or a parallel job on the same GPU, starts from a clean allocator;
* before each job run by a joblib worker, it gives multiprocessing its usual start method back,
  without which the job's DataLoader worker processes fail to start.

Everything here reads the files the runner writes (`metrics.jsonl`, `error.txt`, `.hydra/`), so
the summary is the same for the basic, joblib and submitit launchers, and can be written by hand
for a sweep that did not get to its end (Ctrl-C, or an Optuna search whose every trial failed):

    python -m balatro_train.sweep outputs/multirun/<date>/<time>
"""

from __future__ import annotations

import atexit
import copy
import csv
import gc
import io
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from balatro_train.sweep_folders import for_each_sweep_dir, job_dirs, read_metrics

log = logging.getLogger("balatro_train.sweep")

SUMMARY_FIELDS = ("job", "status", "best_epoch", "epochs", "best_val_loss")  # then <task>/top1_acc, overrides, error


class TrialFailed(Exception):
    """A sweep job that failed: its one-line error, as the sweeper reports it."""


@dataclass
class JobSummary:
    job: str  # the job folder, relative to the sweep folder ("0", "1", ...)
    overrides: list[str]
    status: str  # "ok" | "failed"
    error: str = ""
    best_epoch: int | None = None
    epochs: int = 0  # epochs in metrics.jsonl
    best_val_loss: float | None = None
    top1: dict[str, float] = field(default_factory=dict)  # "<task>/top1_acc" -> value at the best epoch


class SweepSummary(Callback):
    """Writes summary.csv and summary.md at the root of every multirun (see the module docstring)."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        restore_start_method()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        release_gpu_memory()
        if is_optuna_sweep(config):
            report_failed_job(job_return, Path(config.hydra.runtime.output_dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra calls on_multirun_end only when the sweep returns: a sweep stopped by Ctrl-C or
        # ended by its sweeper's error (an Optuna search whose every trial failed) still gets
        # its summary, when the process exits.
        self.sweep_dir, self.written = str(config.hydra.sweep.dir), False
        self.logging = (copy.deepcopy(config.hydra.hydra_logging), config.hydra.verbose)
        atexit.register(self.write_if_not_written)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.written = True
        self.restore_logging()
        write_summary(config.hydra.sweep.dir)

    def write_if_not_written(self) -> None:
        if not self.written and Path(self.sweep_dir).is_dir():
            self.written = True
            self.restore_logging()
            log.warning("the sweep did not get to its end; summary of the jobs so far:")
            write_summary(self.sweep_dir)

    def restore_logging(self) -> None:
        """The basic launcher runs the jobs in this process and leaves the logging set up for the
        last one (its train.log): go back to Hydra's own logging before writing anything."""
        from hydra.core.utils import configure_log

        configure_log(*self.logging)


def is_optuna_sweep(config: DictConfig) -> bool:
    target = OmegaConf.select(config, "hydra.sweeper._target_", default=None)
    return isinstance(target, str) and "optuna" in target.lower()


def report_failed_job(job_return: JobReturn, job_dir: Path) -> None:
    """Turns the runner's NaN (a failed sweep job) into a failed job for the sweeper: optuna<3's
    `study.tell` raises on NaN and the Hydra sweeper then fails while reporting it, ending the
    search; a failed job becomes a failed trial (with `max_failure_rate: 1.0`, the search goes on)."""
    if job_return.status != JobStatus.COMPLETED:
        return
    value = job_return.return_value
    if isinstance(value, float) and math.isnan(value):
        error_file = job_dir / "error.txt"
        error = first_line(error_file) if error_file.is_file() else "the job returned NaN"
        job_return.status = JobStatus.FAILED
        job_return.return_value = TrialFailed(error)


def restore_start_method() -> None:
    """In a joblib worker (loky), multiprocessing's default start method is loky's, which torch's
    DataLoader worker processes can't use ("'Process' object has no attribute 'env'"): give the job
    the platform's own default back (the first of `get_all_start_methods()`: fork on Linux)."""
    import multiprocessing

    if multiprocessing.get_start_method(allow_none=True) == "loky":
        multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)


def release_gpu_memory() -> None:
    """The finished job's cached GPU memory and peak-memory statistics: not the next job's."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    gc.collect()  # the finished job's tensors, should a reference cycle still hold any
    torch.cuda.empty_cache()
    for device in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(device)


def write_summary(sweep_dir: str | Path) -> list[JobSummary]:
    """Reads every job folder of a sweep and writes summary.csv and summary.md at its root."""
    sweep_dir = Path(sweep_dir)
    jobs = sorted((summarize_job(job, sweep_dir) for job in job_dirs(sweep_dir)), key=sort_key)
    tasks = list(dict.fromkeys(key for job in jobs for key in job.top1))
    (sweep_dir / "summary.csv").write_text(summary_csv(jobs, tasks))
    (sweep_dir / "summary.md").write_text(summary_md(jobs, tasks, sweep_dir))
    failed = [job for job in jobs if job.status != "ok"]
    if not jobs:
        log.warning("no job folders in %s: the sweep ran no job", sweep_dir)
    elif failed:
        named = "; ".join(f"job {job.job}: {job.error}" for job in failed[:3]) + ("; ..." if len(failed) > 3 else "")
        log.warning(
            "%d of %d sweep jobs failed (%s); summary: %s", len(failed), len(jobs), named, sweep_dir / "summary.md"
        )
    else:
        log.info("all %d sweep jobs ok, 0 failed; summary: %s", len(jobs), sweep_dir / "summary.md")
    if jobs and jobs[0].status == "ok":
        best, common = jobs[0], common_overrides(jobs)
        log.info(
            "best job %s: val_loss %.4f at epoch %d  %s",
            best.job,
            best.best_val_loss,
            best.best_epoch,
            " ".join(o for o in best.overrides if o not in common),
        )
    return jobs


def summarize_job(job_dir: Path, sweep_dir: Path) -> JobSummary:
    name = job_dir.relative_to(sweep_dir).as_posix()
    overrides = [str(o) for o in (OmegaConf.load(job_dir / ".hydra/overrides.yaml") or [])]
    rows = read_metrics(job_dir / "metrics.jsonl")
    summary = JobSummary(name, overrides, "ok", epochs=len(rows))
    if rows:
        best = min(rows, key=lambda r: r["val_loss"])  # the first of equal losses, as the runner keeps it
        summary.best_epoch, summary.best_val_loss = best["epoch"], best["val_loss"]
        summary.top1 = {k: v for k, v in best.items() if k.endswith("/top1_acc")}
    if (job_dir / "error.txt").is_file():
        summary.status, summary.error = "failed", first_line(job_dir / "error.txt") or "failed (empty error.txt)"
    elif not rows:
        summary.status, summary.error = "failed", "no finished epoch: metrics.jsonl is missing or empty"
    else:
        unfinished = stopped_early_without_error(job_dir, rows)
        if unfinished:
            summary.status, summary.error = "failed", unfinished
    return summary


def stopped_early_without_error(job_dir: Path, rows: list[dict]) -> str:
    """A job with fewer epochs than configured that neither stopped early (patience) nor left an
    error was killed (out of memory, a scheduler's time limit): it did not finish."""
    try:
        trainer = OmegaConf.load(job_dir / ".hydra/config.yaml").trainer
        epochs, patience = int(trainer.epochs), int(trainer.patience or 0)
    except Exception:  # noqa: BLE001  (a config this module can't read: don't judge the job by it)
        return ""
    last = rows[-1]["epoch"]
    best = min(rows, key=lambda r: r["val_loss"])["epoch"]
    if last >= epochs or (patience and last - best >= patience):
        return ""
    return f"stopped after epoch {last} of {epochs} without an error (interrupted or killed)"


def first_line(path: Path) -> str:
    return next((line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()), "")


def sort_key(job: JobSummary) -> tuple:
    """Best validation loss first; failed jobs last, in job order."""
    ok = job.status == "ok"
    return (not ok, job.best_val_loss if ok else 0.0, natural_key(job.job))


def natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def common_overrides(jobs: list[JobSummary]) -> list[str]:
    """The overrides every job of a sweep shares (none when it has a single job)."""
    if len(jobs) < 2:
        return []
    shared = set(jobs[0].overrides).intersection(*(job.overrides for job in jobs[1:]))
    return [o for o in jobs[0].overrides if o in shared]


def summary_csv(jobs: list[JobSummary], tasks: list[str]) -> str:
    """One row per job; `overrides` holds all of the job's overrides, space separated."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*SUMMARY_FIELDS, *tasks, "overrides", "error"])
    for job in jobs:
        writer.writerow(
            [
                job.job,
                job.status,
                blank(job.best_epoch),
                job.epochs,
                blank(job.best_val_loss),
                *(blank(job.top1.get(task)) for task in tasks),
                " ".join(job.overrides),
                job.error,
            ]
        )
    return out.getvalue()


def summary_md(jobs: list[JobSummary], tasks: list[str], sweep_dir: Path) -> str:
    """A table for people: the overrides all jobs share are said once, above it."""
    common = common_overrides(jobs)
    failed = sum(job.status != "ok" for job in jobs)
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"{len(jobs)} jobs: {len(jobs) - failed} ok, {failed} failed. Best validation loss first; "
        f"top-1 accuracies are those of the best epoch.",
    ]
    if common:
        lines += ["", "Overrides of every job: " + " ".join(f"`{o}`" for o in common)]
    optuna = sweep_dir / "optimization_results.yaml"
    if optuna.is_file():
        result = OmegaConf.load(optuna)
        if "best_value" in result:
            params = " ".join(f"`{k}={v}`" for k, v in result.best_params.items())
            lines += ["", f"Optuna's best trial: value {result.best_value:.4f}, {params}"]
    header = ["job", "status", "best epoch", "epochs", "best val_loss", *tasks, "overrides", "error"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for job in jobs:
        overrides = [o for o in job.overrides if o not in common]
        cells = [
            job.job,
            job.status,
            blank(job.best_epoch),
            str(job.epochs),
            number(job.best_val_loss),
            *(number(job.top1.get(task)) for task in tasks),
            " ".join(f"`{o}`" for o in overrides),
            job.error,
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def blank(value: Any) -> str:
    return "" if value is None else str(value)


def number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}"


def main(argv: list[str] | None = None) -> None:
    for_each_sweep_dir(
        "python -m balatro_train.sweep", "Write summary.csv and summary.md of sweep folders.", write_summary, argv
    )


if __name__ == "__main__":
    main()
