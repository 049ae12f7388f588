"""`python -m balatro_train.knn [--checkpoint FILE] [--seeds 0 1 2 3 4] [--out DIR] [hydra overrides]`: the
no-training baseline a trained recipe has to beat.

For each seed it reads the data as a run of that seed would (the same split, `build_data`), embeds every
training screenshot with a frozen backbone (the configured model's, e.g. `model=efficientnet_lite0` with its
ImageNet weights, or with `--checkpoint` a trained checkpoint's backbone and preprocessing), and classifies
each validation screenshot by the cosine of its embedding (centred by the training mean, L2-normalised) to
  nearest      the nearest training screenshot (1-NN), and
  class mean   the mean embedding of each class (what enrolment does with a card's screenshots).
It writes knn.md and knn.json (default outputs/knn/<date>_<time>/): per task and rule, top-1 over the seeds
with its 95% confidence interval, and for identification top-1 by how many training screenshots the card had
and by edition, as quality.md reports them for a trained recipe.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from balatro_train.checkpoint import load_checkpoint
from balatro_train.config import CONFIG_DIR, check_config, typed_config
from balatro_train.data import build_data
from balatro_train.errors import UserError, exit_on_user_error
from balatro_train.labels import read_labels
from balatro_train.model import build_model
from balatro_train.sweep_folders import BREAKDOWNS, identification_breakdown, mean_ci, pooled

log = logging.getLogger("balatro_train.knn")
RULES = ("nearest", "class_mean")


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="embed with this trained checkpoint's backbone")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="the seeded splits")
    parser.add_argument("--out", type=Path, help="report folder (default outputs/knn/<date>_<time>)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m balatro_train")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or Path("outputs/knn") / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    if out.exists() and not out.is_dir():  # found out before a minute of embedding, not after it
        raise UserError(f"--out={out} is a file; give a folder for knn.md and knn.json")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = typed_config(compose(config_name="train", overrides=args.overrides))
    check_config(cfg)
    report = run(cfg, args.seeds, args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    (out / "knn.json").write_text(json.dumps(report, indent=1))
    (out / "knn.md").write_text(markdown(report))
    for rule in RULES:
        log.info(
            "%s: %s",
            rule,
            "  ".join(f"{t}/top1 {v['mean']:.3f} ± {v['ci95']:.3f}" for t, v in report["rules"][rule]["top1"].items()),
        )
    log.info("report: %s", out / "knn.md")
    return report


def run(cfg, seeds: list[int], checkpoint: Path | None = None) -> dict:
    """Every seed's figures and their means over the seeds."""
    if checkpoint is not None:
        trained = load_checkpoint(checkpoint, "--checkpoint")
        cfg.data.image_size, cfg.data.background = (
            trained.preprocessing.image_size,
            list(trained.preprocessing.background),
        )
        model, source = trained.model(), f"the backbone of {checkpoint}"
    else:
        model = build_model(cfg.model, {"embedding": ["a", "b"]}).eval()  # the heads are not used
        source = f"{cfg.model.backbone}, first weights: {model.pretrained_source or 'random init'}"
    if cfg.dataset.render is not None:
        instantiate(cfg.dataset.render)
    results = [seed_result(cfg, seed, model) for seed in seeds]
    return {
        "embedding": source,
        "image_size": cfg.data.image_size,
        "seeds": seeds,
        "seconds_per_seed": float(np.mean([r["seconds"] for r in results])),
        "rules": {
            rule: {
                "top1": {task: mean_ci([r[rule]["top1"][task] for r in results]) for task in results[0][rule]["top1"]},
                **{key: pooled([r[rule] for r in results], key) for key in BREAKDOWNS if key in results[0][rule]},
            }
            for rule in RULES
        },
        "per_seed": results,
    }


def seed_result(cfg, seed: int, model) -> dict:
    started = time.perf_counter()
    cfg.seed = seed
    data = build_data(cfg)
    train, val = embed(model, data.train.images, data), embed(model, data.val.images, data)
    train, val = centred_units(train, val)
    originals = {s.file: s.meta for s in read_labels(cfg.dataset.labels_file, cfg.dataset.root)}
    result = {"seed": seed}
    for rule in RULES:
        result[rule] = {"top1": {}}
        predictions = {file: {} for file in data.split["val"]}
        for task, names in data.class_names.items():
            known, truth = data.train.targets[task], data.val.targets[task]
            predicted = classify(val, train, known, len(names), rule)
            result[rule]["top1"][task] = (predicted == truth).float().mean().item()
            for file, true, pred in zip(data.split["val"], truth.tolist(), predicted.tolist(), strict=True):
                predictions[file][task] = {"true": names[true], "pred": names[pred]}
        if "identification" in data.class_names:
            field = cfg.tasks.identification.field
            result[rule].update(identification_breakdown(predictions, data.split["train"], originals, field))
    result["seconds"] = time.perf_counter() - started
    log.info(
        "seed %d: %s",
        seed,
        "  ".join(f"{rule} {task} {v:.3f}" for rule in RULES for task, v in result[rule]["top1"].items()),
    )
    return result


@torch.no_grad()
def embed(model, images: np.ndarray, data, batch_size: int = 64) -> torch.Tensor:
    """The backbone's pooled features of decoded images, prepared by the run's validation pipeline."""
    pipeline = data.preprocessing.pipeline()
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack(
            [
                torch.from_numpy(np.ascontiguousarray(pipeline(image=image)["image"]))
                for image in images[start : start + batch_size]
            ]
        )
        chunks.append(model.backbone(model.input(batch)).float())
    return torch.cat(chunks)


def centred_units(train: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets of embeddings centred by the training mean and L2-normalised. Pooled CNN features are all
    positive and share a large common part: uncentred, every cosine is near 1 and that part decides."""
    centre = train.mean(dim=0)
    return F.normalize(train - centre, dim=1), F.normalize(val - centre, dim=1)


def classify(val: torch.Tensor, train: torch.Tensor, known: torch.Tensor, classes: int, rule: str) -> torch.Tensor:
    """Each validation embedding's class by the cosine (unit vectors: the dot product) to the training ones."""
    if rule == "nearest":
        return known[(val @ train.T).argmax(dim=1)]
    means = torch.zeros(classes, train.shape[1]).index_add_(0, known, train)
    return (val @ F.normalize(means, dim=1).T).argmax(dim=1)  # a class without training image: a zero row


def markdown(report: dict) -> str:
    def cell(v: dict) -> str:
        return f"{v['mean']:.3f} ± {v['ci95']:.3f}"

    lines = [
        f"# No-training baseline (k-NN) over {len(report['seeds'])} seeded splits",
        "",
        f"Embedding: {report['embedding']}, {report['image_size']} px; seeds {report['seeds']}; "
        f"{report['seconds_per_seed']:.0f} s per seed (read, embed, classify). Mean ± half-width of the "
        f"95% confidence interval over the seeds.",
        "",
        "| rule | " + " | ".join(f"{t} top-1" for t in report["rules"]["nearest"]["top1"]) + " |",
        "|---|" + "---|" * len(report["rules"]["nearest"]["top1"]),
    ]
    lines += [
        f"| {rule} | " + " | ".join(cell(v) for v in report["rules"][rule]["top1"].values()) + " |" for rule in RULES
    ]
    for key, title in BREAKDOWNS.items():
        groups = sorted({g for rule in RULES for g in report["rules"][rule].get(key, {})})
        if groups:
            lines += [
                "",
                f"## {title}",
                "",
                "| rule | " + " | ".join(groups) + " |",
                "|---|" + "---|" * len(groups),
            ]
            lines += [
                f"| {rule} | "
                + " | ".join(
                    cell(report["rules"][rule][key][g]) if g in report["rules"][rule][key] else "–" for g in groups
                )
                + " |"
                for rule in RULES
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
