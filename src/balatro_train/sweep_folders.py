"""Reading the folders a sweep leaves, for the reports written at its root (sweep.py's summary, quality.py's
and openset.py's benchmarks): its job folders, a job's metrics.jsonl, the mean and confidence interval of a
figure over seeds, and the command line that writes a report for folders given by hand."""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from pathlib import Path


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders are those Hydra saved a job's overrides in (whatever hydra.sweep.subdir is)."""
    return [p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")]


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's rows with a finite val_loss; a line cut short by a killed job is left out."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            loss = row.get("val_loss") if isinstance(row, dict) else None
            if isinstance(loss, (int, float)) and math.isfinite(loss):
                rows.append(row)
    return rows


def mean_ci(values: list[float]) -> dict:
    """Mean and the half-width of its 95% confidence interval (Student's t; 0 for a single value)."""
    from scipy import stats

    mean = statistics.fmean(values)
    half = (
        0.0
        if len(values) < 2
        else stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    )
    return {"mean": mean, "ci95": half, "values": values}


def for_each_sweep_dir(prog: str, description: str, write, argv: list[str] | None = None) -> None:
    """The command line of a report written from sweep folders (the summary, the benchmarks' reports)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "sweep_dirs",
        nargs="+",
        type=Path,
        metavar="SWEEP_DIR",
        help="a sweep's folder, e.g. outputs/multirun/<date>/<time>",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for sweep_dir in args.sweep_dirs:
        if not sweep_dir.is_dir():
            parser.error(f"{sweep_dir} is not a folder")
        write(sweep_dir)
