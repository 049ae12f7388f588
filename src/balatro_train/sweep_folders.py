"""Reading the folders a sweep leaves, for the reports written at its root (sweep.py's summary, quality.py's
and openset.py's benchmarks, knn.py's baseline): its job folders, a job's metrics.jsonl, the figures the
reports share (the mean and confidence interval over seeds; identification top-1 by how many training
screenshots the card had and by edition), and the command line that writes a report for folders given by hand."""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from collections import Counter, defaultdict
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


BUCKETS = (("1", 1, 1), ("2-4", 2, 4), ("5+", 5, math.inf))  # training screenshots of the card


def identification_breakdown(predictions: dict, train_files: list[str], originals: dict, field: str) -> dict:
    """Top-1 of the validation `predictions` ({file: {task: {"true": name, "pred": name}}}) by group, each as
    (top-1, images): identification by how many original training screenshots its card had (`BUCKETS`) and by
    its edition (the labels' modifier), and where a modifier task ran, its top-1 by edition (each edition's
    recall: is a Holographic card called Holographic?); `originals`: the labels entries by file."""
    seen = Counter(str(originals[f][field]) for f in train_files if f in originals)
    groups = {key: defaultdict(list) for key in BREAKDOWNS}
    for file, p in predictions.items():
        right = p["identification"]["true"] == p["identification"]["pred"]
        count = seen[p["identification"]["true"]]
        edition = str(originals[file].get("modifier", "?"))
        groups["identification_by_training_count"][next(n for n, low, high in BUCKETS if low <= count <= high)].append(
            right
        )
        groups["identification_by_edition"][edition].append(right)
        if "modifier" in p:
            groups["modifier_by_edition"][p["modifier"]["true"]].append(p["modifier"]["true"] == p["modifier"]["pred"])
    return {key: {g: (sum(v) / len(v), len(v)) for g, v in by_group.items()} for key, by_group in groups.items()}


# What identification_breakdown reports, in the reports' order, with the reports' titles.
BREAKDOWNS = {
    "identification_by_training_count": "Identification top-1 by training screenshots of the card",
    "identification_by_edition": "Identification top-1 by edition",
    "modifier_by_edition": "Modifier top-1 by edition (each edition's recall)",
}


def pooled(results: list[dict], key: str) -> dict:
    """Per group (bucket or edition): mean over seeds of its top-1, with the CI, and the images it had."""
    groups = sorted({g for r in results for g in r.get(key, {})})
    return {
        g: {
            **mean_ci([r[key][g][0] for r in results if g in r[key]]),
            "images_per_seed": statistics.fmean(r[key][g][1] for r in results if g in r[key]),
        }
        for g in groups
    }


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
