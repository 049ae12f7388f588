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

from balatro_train.labels import read_labels
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
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_report(Path(config.hydra.sweep.dir), time.perf_counter() - getattr(self, "started", time.perf_counter()))


def seed_result(job: Path) -> dict | None:
    """One seed's numbers, from its run folder; None for a job that left no finished epoch."""
    rows = read_metrics(job / "metrics.jsonl")
    predictions_file = job / "val_predictions.json"
    if not rows or not predictions_file.is_file():
        return None
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    best = min(rows, key=lambda r: r["val_loss"])
    predictions = json.loads(predictions_file.read_text())
    split = json.loads((job / "split.json").read_text())
    originals = {s.file: s.meta for s in read_labels(cfg.dataset.labels_file, cfg.dataset.root)}
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
    return result


def write_report(sweep_dir: Path, wall_seconds: float | None = None) -> dict:
    results = sorted((r for r in map(seed_result, job_dirs(sweep_dir)) if r), key=lambda r: r["seed"])
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
    lines += [f"| {t} | {cell(v['top1'])} | {cell(v['f1'])} |" for t, v in report["tasks"].items()]
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
