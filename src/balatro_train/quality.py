"""How good a recipe is, over several seeded splits: quality.md and quality.json at a sweep's root.

`python -m balatro_train -m benchmark=quality [overrides]` (conf/benchmark/quality.yaml) trains the
same recipe on K seeds side by side; `QualityReport`, a Hydra callback it registers, then reads each
job's run folder (metrics.jsonl, split.json, val_predictions.json, its saved config) and writes:

* per task: top-1 and macro F1 (NaN where the task declares no f1 metric) of each seed's best epoch, their
  mean and 95% confidence interval (Student's t over the seeds: one split of a few hundred images is noisy
  by several points);
* identification top-1 by how many training screenshots the card had (1, 2-4, 5+): what a user
  with one or two screenshots of a card can expect;
* identification top-1 by edition (the validation image's modifier): is a Foil card still recognised?
* modifier top-1 by edition (each edition's recall): is a Holographic card called Holographic?
* per task, the top-1 on the validation images without a near-duplicate among the training screenshots, and
  the share that have one (balatro_train/near_duplicates.py): what a split of near-identical captures hides;
* wall time of the whole benchmark and the mean training images/s.

By hand, for a sweep folder (e.g. one stopped early): python -m balatro_train.quality <sweep dir>
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from balatro_train.errors import UserError
from balatro_train.labels import read_labels
from balatro_train.near_duplicates import DEFAULT_MAX_DISTANCE, has_near_duplicate, perceptual_hashes
from balatro_train.sweep_folders import (
    BREAKDOWNS,
    for_each_sweep_dir,
    identification_breakdown,
    job_dirs,
    mean_ci,
    pooled,
    read_metrics,
)

log = logging.getLogger("balatro_train.quality")


class QualityReport(Callback):
    """Registered by conf/benchmark/quality.yaml; `near_duplicate_distance` (hydra.callbacks.quality_report.
    near_duplicate_distance): the perceptual-hash bits within which a validation image counts as a near-copy
    of a training one (balatro_train/near_duplicates.py)."""

    def __init__(self, near_duplicate_distance: int = DEFAULT_MAX_DISTANCE) -> None:
        if not isinstance(near_duplicate_distance, int) or not 0 <= near_duplicate_distance <= 64:
            raise UserError(
                f"hydra.callbacks.quality_report.near_duplicate_distance={near_duplicate_distance} must be a "
                f"number of bits from 0 to 64"
            )
        self.near_duplicate_distance = near_duplicate_distance

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        wall = time.perf_counter() - getattr(self, "started", time.perf_counter())
        write_report(Path(config.hydra.sweep.dir), wall, self.near_duplicate_distance)


def seed_result(
    job: Path, near_duplicate_distance: int = DEFAULT_MAX_DISTANCE, hashes: dict | None = None
) -> dict | None:
    """One seed's numbers, from its run folder; None for a job that left no finished epoch. `hashes`: the
    perceptual hashes computed so far, by image path (filled in here; shared by the seeds of one dataset)."""
    rows = read_metrics(job / "metrics.jsonl")
    predictions_file = job / "val_predictions.json"
    if not rows or not predictions_file.is_file():
        return None
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    best = min(rows, key=lambda r: r["val_loss"])
    predictions = json.loads(predictions_file.read_text())
    split = json.loads((job / "split.json").read_text())
    samples = {s.file: s for s in read_labels(cfg.dataset.labels_file, cfg.dataset.root)}
    originals = {file: s.meta for file, s in samples.items()}
    result = {
        "seed": int(cfg.seed),
        "best_epoch": best["epoch"],
        "top1": {},
        "f1": {},
        "seconds": sum(r["epoch_seconds"] for r in rows),
        "images_per_sec": statistics.fmean(r["train_images_per_sec"] for r in rows),
    }
    for task in next(iter(predictions.values())):
        pairs = [(p[task]["true"], p[task]["pred"]) for p in predictions.values()]
        result["top1"][task] = sum(t == p for t, p in pairs) / len(pairs)
        result["f1"][task] = best.get(f"{task}/f1", math.nan)  # the runner's own (torchmetrics, macro)
    if "identification" in result["top1"]:
        result.update(identification_breakdown(predictions, split["train"], originals, cfg.tasks.identification.field))
    result["near_duplicates"] = near_duplicate_figures(
        predictions, split["train"], samples, near_duplicate_distance, hashes
    )
    return result


def near_duplicate_figures(predictions: dict, train_files: list[str], samples: dict, max_distance: int, hashes) -> dict:
    """The share of validation images with a near-duplicate among the training originals, and per task the
    top-1 on those without one: the figure a per-image split of near-identical captures cannot inflate."""
    hashes = {} if hashes is None else hashes
    val_paths = [samples[f].path for f in predictions]
    train_paths = [samples[f].path for f in train_files if f in samples]
    hashes.update(perceptual_hashes(p for p in {*val_paths, *train_paths} if p not in hashes))
    near = has_near_duplicate(val_paths, train_paths, hashes, max_distance)
    without = [p for p, n in zip(predictions.values(), near, strict=True) if not n]
    tasks = next(iter(predictions.values()))
    return {
        "max_distance": max_distance,
        "share_with": sum(near) / len(near),
        "images_without": len(without),
        "top1_without": {
            t: sum(p[t]["true"] == p[t]["pred"] for p in without) / len(without) if without else math.nan for t in tasks
        },
    }


def write_report(
    sweep_dir: Path, wall_seconds: float | None = None, near_duplicate_distance: int = DEFAULT_MAX_DISTANCE
) -> dict:
    hashes: dict = {}
    results = [seed_result(job, near_duplicate_distance, hashes) for job in job_dirs(sweep_dir)]
    results = sorted((r for r in results if r), key=lambda r: r["seed"])
    if not results:
        log.warning("no finished job with val_predictions.json in %s: no quality report", sweep_dir)
        return {}
    tasks = list(results[0]["top1"])
    report = {
        "sweep": str(sweep_dir),
        "seeds": [r["seed"] for r in results],
        "wall_seconds": wall_seconds,
        "images_per_sec": statistics.fmean(r["images_per_sec"] for r in results),
        "tasks": {
            t: {"top1": mean_ci([r["top1"][t] for r in results]), "f1": mean_ci([r["f1"][t] for r in results])}
            for t in tasks
        },
        **{key: pooled(results, key) for key in BREAKDOWNS},
        "near_duplicates": {
            "max_distance": near_duplicate_distance,
            "share_with": mean_ci([r["near_duplicates"]["share_with"] for r in results]),
            "images_without_per_seed": statistics.fmean(r["near_duplicates"]["images_without"] for r in results),
            "top1_without": {t: mean_ci([r["near_duplicates"]["top1_without"][t] for r in results]) for t in tasks},
        },
        "per_seed": results,
    }
    (sweep_dir / "quality.json").write_text(json.dumps(report, indent=1))
    (sweep_dir / "quality.md").write_text(markdown(report))
    log.info(
        "quality over %d seeds: %s; report: %s",
        len(results),
        "  ".join(f"{t}/top1 {v['top1']['mean']:.3f} ± {v['top1']['ci95']:.3f}" for t, v in report["tasks"].items()),
        sweep_dir / "quality.md",
    )
    return report


def markdown(report: dict) -> str:
    def cell(v: dict) -> str:
        return f"{v['mean']:.3f} ± {v['ci95']:.3f}"

    wall = f"{report['wall_seconds']:.0f} s" if report["wall_seconds"] else "not measured"
    lines = [
        f"# Quality over {len(report['seeds'])} seeded splits: {report['sweep']}",
        "",
        f"Seeds {report['seeds']}; mean ± half-width of the 95% confidence interval over the seeds. "
        f"Wall time {wall}; training {report['images_per_sec']:.0f} images/s per job.",
        "",
        "| task | top-1 | macro F1 |",
        "|---|---|---|",
    ]
    near = report["near_duplicates"]
    lines[-2:] = [
        f"| task | top-1 | macro F1 | top-1 without a near-duplicate in training ({near['max_distance']} bits) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {t} | {cell(v['top1'])} | {cell(v['f1'])} | {cell(near['top1_without'][t])} |"
        for t, v in report["tasks"].items()
    ]
    lines += [
        "",
        f"{near['share_with']['mean']:.1%} of the validation images have a near-duplicate among the training "
        f"screenshots (perceptual hash within {near['max_distance']} bits); "
        f"{near['images_without_per_seed']:.0f} per seed have none.",
    ]
    for key, title in BREAKDOWNS.items():
        if report.get(key):
            lines += ["", f"## {title}", "", "| group | top-1 | validation images per seed |", "|---|---|---|"]
            lines += [f"| {g} | {cell(v)} | {v['images_per_seed']:.0f} |" for g, v in report[key].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    for_each_sweep_dir(
        "python -m balatro_train.quality", "Write quality.md and quality.json of benchmark sweeps.", write_report, argv
    )


if __name__ == "__main__":
    main()
