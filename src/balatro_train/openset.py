"""Cards a model has never seen: openset.md and openset.json at the root of an open-set benchmark sweep.

`python -m balatro_train -m benchmark=openset` (conf/benchmark/openset.yaml) trains the recipe on K
seeds, each holding `data.held_out_cards` cards out of training and validation entirely (split.json
lists their screenshots under `held_out`). `OpenSetReport`, a Hydra callback it registers, then takes
each seed's best checkpoint and measures, for its embedding-head task (identification):

1. before enrolment: AUROC of known vs never-seen cards by the best cosine to a prototype (known:
   the seed's validation images; never seen: every screenshot of the held-out cards), and at the
   checkpoint's calibrated threshold, the known images accepted and the unseen ones rejected;
2. after enrolling every held-out card at once from 1 (and from 3) of its screenshots, drawn by the
   seed, as `python -m balatro_train.enroll` does (with its colour-inverted view): top-1 on the held-out
   cards' other screenshots, and the change in top-1 on the known validation images;
3. the time enrolling one card takes: reading its screenshots, embedding them (and their inverted
   views), adding the prototype
   (the mean over the held-out cards, 3 screenshots each; no training step, no file written).

Every figure is the mean over the seeds with its 95% confidence interval (Student's t), as in
quality.md. By hand, for a sweep folder: python -m balatro_train.openset <sweep dir>
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from balatro_train.checkpoint import load_checkpoint
from balatro_train.enrolment import enroll, enrolment_views
from balatro_train.inference import Recognizer
from balatro_train.labels import read_labels
from balatro_train.sweep_folders import for_each_sweep_dir, job_dirs, mean_ci

log = logging.getLogger("balatro_train.openset")
SHOTS = (1, 3)
FIGURES = {  # key: what the report calls it
    "auroc": "AUROC, known vs never-seen cards (best cosine)",
    "known_accepted": "known validation images accepted at the calibrated threshold",
    "unseen_rejected": "never-seen cards' screenshots rejected as unknown",
    "known_top1": "top-1 on known validation images, before enrolment",
    **{f"enrolled_top1_{k}shot": f"top-1 on enrolled cards' other screenshots, enrolled from {k}" for k in SHOTS},
    **{f"known_top1_change_{k}shot": f"change of top-1 on known images after enrolling from {k}" for k in SHOTS},
    "enrol_seconds_per_card": "seconds to enrol one card (3 screenshots: read, embed, add)",
}


class OpenSetReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_report(Path(config.hydra.sweep.dir))


def seed_result(job: Path) -> dict | None:
    """One seed's figures, from its run folder; None for a job without a best checkpoint or held-out cards."""
    best, split_file = job / "checkpoints" / "best.pt", job / "split.json"
    if not best.is_file() or not split_file.is_file():
        return None
    split, cfg = json.loads(split_file.read_text()), OmegaConf.load(job / ".hydra" / "config.yaml")
    if not split.get("held_out"):
        log.warning("%s: no held-out cards (data.held_out_cards=0): no open-set figures", job)
        return None
    state = load_checkpoint(best, "checkpoint")
    recognizer = Recognizer(state, "cpu")
    if not recognizer.scales:
        log.warning("%s: no task has an embedding head (tasks.<task>.head=cosine): no open-set figures", job)
        return None
    task = "identification" if "identification" in recognizer.scales else next(iter(recognizer.scales))
    field, seed = state.fields[task], int(cfg.seed)
    samples = {s.file: s for s in read_labels(cfg.dataset.labels_file, cfg.dataset.root)}
    images = {f: recognizer.preprocessing.load(samples[f].path) for f in split["val"] + split["held_out"]}
    known = [f for f in split["val"]]

    def top1_and_scores(rec: Recognizer, files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = rec.logits([images[f] for f in files])
        names = rec.class_names[task]
        right = logits[task].argmax(dim=1) == torch.tensor([names.index(str(samples[f].meta[field])) for f in files])
        return right.float(), rec.max_cosines(logits)[task]

    from torchmetrics.functional.classification import binary_auroc

    known_right, known_scores = top1_and_scores(recognizer, known)
    unseen_scores = recognizer.max_cosines(recognizer.logits([images[f] for f in split["held_out"]]))[task]
    threshold = recognizer.thresholds[task]
    result = {
        "seed": seed,
        "task": task,
        "held_out_cards": 0,
        "threshold": threshold,
        "auroc": binary_auroc(
            torch.cat([known_scores, unseen_scores]),
            torch.cat([torch.ones(len(known)), torch.zeros(len(unseen_scores))]).long(),
        ).item(),
        "known_accepted": (known_scores >= threshold).float().mean().item(),
        "unseen_rejected": (unseen_scores < threshold).float().mean().item(),
        "known_top1": known_right.mean().item(),
    }
    by_card = defaultdict(list)
    for f in split["held_out"]:
        by_card[str(samples[f].meta[field])].append(f)
    result["held_out_cards"] = len(by_card)
    for shots in SHOTS:
        rng = np.random.default_rng([seed, shots])
        chosen = {card: [files[i] for i in rng.permutation(len(files))] for card, files in by_card.items()}
        enrol_files = [f for files in chosen.values() for f in files[:shots]]
        test_files = [f for files in chosen.values() for f in files[shots:]]
        enrolled, _ = enroll(
            state, *embedded(recognizer, [images[f] for f in enrol_files], [samples[f].meta for f in enrol_files])
        )
        after = Recognizer(enrolled, "cpu")
        result[f"enrolled_top1_{shots}shot"] = top1_and_scores(after, test_files)[0].mean().item()
        result[f"known_top1_change_{shots}shot"] = top1_and_scores(after, known)[0].mean().item() - result["known_top1"]
    seconds = []
    for files in by_card.values():
        started = time.perf_counter()
        shots = [recognizer.preprocessing.load(samples[f].path) for f in files[:3]]
        enroll(state, *embedded(recognizer, shots, [samples[f].meta for f in files[:3]]))
        seconds.append(time.perf_counter() - started)
    result["enrol_seconds_per_card"] = float(np.mean(seconds))
    return result


def embedded(recognizer: Recognizer, images: list, values: list[dict]) -> tuple[dict, list[dict]]:
    """What `python -m balatro_train.enroll` embeds for these screenshots (its default views), and their values."""
    views, values = enrolment_views(images, values)
    return recognizer.embeddings(views), values


def write_report(sweep_dir: Path) -> dict:
    results = sorted((r for r in map(seed_result, job_dirs(sweep_dir)) if r), key=lambda r: r["seed"])
    if not results:
        log.warning("no finished job with held-out cards and an embedding head in %s: no open-set report", sweep_dir)
        return {}
    report = {
        "sweep": str(sweep_dir),
        "seeds": [r["seed"] for r in results],
        "task": results[0]["task"],
        "held_out_cards": results[0]["held_out_cards"],
        "figures": {key: mean_ci([r[key] for r in results]) for key in FIGURES},
        "per_seed": results,
    }
    (sweep_dir / "openset.json").write_text(json.dumps(report, indent=1))
    (sweep_dir / "openset.md").write_text(markdown(report))
    log.info(
        "open set over %d seeds: AUROC %.3f, enrolled from 1: %.3f, from 3: %.3f; report: %s",
        len(results),
        report["figures"]["auroc"]["mean"],
        report["figures"]["enrolled_top1_1shot"]["mean"],
        report["figures"]["enrolled_top1_3shot"]["mean"],
        sweep_dir / "openset.md",
    )
    return report


def markdown(report: dict) -> str:
    lines = [
        f"# Cards never seen in training, over {len(report['seeds'])} seeds: {report['sweep']}",
        "",
        f"Seeds {report['seeds']}; task {report['task']}; {report['held_out_cards']} cards held out of training "
        f"per seed. Mean ± half-width of the 95% confidence interval over the seeds.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    lines += [
        f"| {title} | {report['figures'][key]['mean']:.3f} ± {report['figures'][key]['ci95']:.3f} |"
        for key, title in FIGURES.items()
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    for_each_sweep_dir(
        "python -m balatro_train.openset",
        "Write openset.md and openset.json of open-set benchmark sweeps.",
        write_report,
        argv,
    )


if __name__ == "__main__":
    main()
