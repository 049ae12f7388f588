"""`python -m balatro_train.evaluate checkpoint=<file or run folder> [dataset=annotated dataset.labels_file=...]`

Scores every task of a checkpoint on ALL original images of a labelled set (no split;
augmented files are ignored), prepared exactly as validation prepared them. Writes into
`out_dir` (default outputs/evaluate/<run>_<checkpoint stem>, or <checkpoint stem> outside a run):
  metrics.json                 per task: every scalar metric the checkpoint's task config declares
                               (conf/task: top1_acc, top3_acc with 3+ classes, macro precision/recall/f1)
  confusion_<task>.png         the confusion matrix (beyond 10 classes, the block of the 10 most confused)
  confusion_summary.md, .csv   per task and class: support, precision, recall, F1 and the classes it is
                               most often taken for, worst first
  misclassified_<task>.png     the misclassified images, true and predicted label under each
  report.md                    all of the above on one page

metrics.json's `near_duplicates`: where the checkpoint's training screenshots can be read (its split and its
training labels file), how many evaluated images are training images, how many of the others have a
near-duplicate among them (perceptual hash within `near_duplicate_distance` bits, balatro_train/near_duplicates.py),
and per task the top-1 on the images that have none: the figure near-copies of training captures cannot inflate.

A task with an embedding head (tasks.<task>.head=cosine) may be given cards the checkpoint does not
know: its closed-set metrics are then those of the known cards' images, and metrics.json's
`open_set` reports how well "unknown" separates the two: AUROC of known vs unknown by the best
cosine to a prototype, and at the checkpoint's calibrated threshold the known images accepted and
correctly named, and the unknown images rejected.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from balatro_train.checkpoint import Checkpoint, load_checkpoint
from balatro_train.config import CONFIG_DIR
from balatro_train.data import load_images
from balatro_train.errors import UserError, exit_on_user_error
from balatro_train.inference import Recognizer, log_to_stderr, resolve_checkpoint
from balatro_train.labels import check_fields, read_labels
from balatro_train.metrics import (
    TILE,
    build_metrics,
    confusion_figure,
    confusion_summary,
    misclassified_grid,
    scalars_and_matrices,
    write_confusion_summaries,
)
from balatro_train.near_duplicates import DEFAULT_MAX_DISTANCE, has_near_duplicate, perceptual_hashes
from balatro_train.preprocessing import load_image
from balatro_train.run_folder import holds_a_run

log = logging.getLogger("balatro_train.evaluate")


# The figure needs a confusion matrix, whether or not the task config declares one.
CONFUSION_MATRIX = {"_target_": "torchmetrics.classification.MulticlassConfusionMatrix", "_partial_": True}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    log_to_stderr()
    if cfg.dataset.get("render") is not None:  # the demo set is rendered on first use
        instantiate(cfg.dataset.render)
    evaluate(
        cfg.checkpoint,
        cfg.dataset.labels_file,
        cfg.dataset.root,
        cfg.out_dir,
        cfg.device,
        cfg.batch_size,
        cfg.max_grid_images,
        cfg.near_duplicate_distance,
    )


def evaluate(
    checkpoint,
    labels_file,
    root=".",
    out_dir=None,
    device="auto",
    batch_size=64,
    max_grid_images=32,
    near_duplicate_distance=DEFAULT_MAX_DISTANCE,
) -> dict:
    """Evaluate and write the report; returns what metrics.json holds."""
    if not isinstance(near_duplicate_distance, int) or not 0 <= near_duplicate_distance <= 64:
        raise UserError(f"near_duplicate_distance={near_duplicate_distance} must be a number of bits from 0 to 64")
    path = resolve_checkpoint(checkpoint)
    out_dir = Path(out_dir) if out_dir else default_out_dir(path)
    if holds_a_run(out_dir):  # its confusion_summary.md and metrics would be replaced by this report's
        raise UserError(
            f"out_dir={out_dir} holds a training run (metrics.jsonl, checkpoints/); an evaluation "
            f"never writes into a run's folder: give another out_dir="
        )
    state = load_checkpoint(path, "checkpoint")
    tasks = OmegaConf.create(state.task_configs)
    samples = read_labels(labels_file, root)  # originals only: augmented copies would flatter the scores
    if not samples:
        raise UserError(f"dataset.labels_file={labels_file}: the dataset is empty; label some images first")
    check_fields(samples, tasks, [str(labels_file)])
    recognizer = Recognizer(state, device, batch_size)
    targets = {
        task: class_indices(
            task,
            [str(s.meta[tasks[task].field]) for s in samples],
            state.class_names[task],
            labels_file,
            open_set=task in recognizer.scales,
        )
        for task in state.tasks
    }

    prep = recognizer.preprocessing
    images, bad = load_images(samples, prep.image_size, prep.background)
    for problem in bad.values():
        log.warning("skipping %s", problem)
    keep = [i for i, s in enumerate(samples) if s.file not in bad]
    if not keep:
        raise UserError(f"dataset.labels_file={labels_file}: none of its images is readable")
    samples, images = [samples[i] for i in keep], images[keep]
    log.info("evaluating %s on %d images of %s (%s)", path, len(samples), labels_file, recognizer.device)
    logits = recognizer.logits(images)
    probs, scores = {task: values.softmax(dim=1) for task, values in logits.items()}, recognizer.max_cosines(logits)

    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "checkpoint": str(path),
        "labels_file": str(labels_file),
        "num_images": len(samples),
        "skipped": sorted(bad),
        "tasks": {},
        "open_set": {},
    }
    import matplotlib.pyplot as plt  # confusion_figure's figures belong to pyplot: closed here, or they pile up

    mistakes, summaries, right = {}, {}, {}
    for task, names in state.class_names.items():
        target = targets[task][keep]
        known = target >= 0
        if not known.all():
            report["open_set"][task] = open_set_metrics(
                scores[task], known, probs[task].argmax(dim=1) == target, recognizer.thresholds[task]
            )
            if not known.any():
                continue
        task_samples = [s for s, k in zip(samples, known.tolist(), strict=True) if k]
        task_probs, target = probs[task][known], target[known]
        true_list = target.tolist()
        declared = OmegaConf.to_container(tasks[task].metrics)
        metrics = build_metrics(task, OmegaConf.create({**declared, "confusion_matrix": CONFUSION_MATRIX}), len(names))
        scalars, matrices = scalars_and_matrices(metrics(task_probs, target))
        report["tasks"][task] = scalars
        figure = confusion_figure(matrices["confusion_matrix"], names, f"{task}: {path.name}, {len(target)} images")
        figure.savefig(out_dir / f"confusion_{task}.png", dpi=100)
        plt.close(figure)
        summaries[task] = confusion_summary(matrices["confusion_matrix"], names)
        confidence, predicted = (values.tolist() for values in task_probs.max(dim=1))
        right[task] = {s.path: t == p for s, t, p in zip(task_samples, true_list, predicted, strict=True)}
        wrong = [i for i, (t, p) in enumerate(zip(true_list, predicted, strict=True)) if t != p]
        mistakes[task] = [
            (task_samples[i].file, names[true_list[i]], names[predicted[i]], confidence[i]) for i in wrong
        ]
        shown = wrong[:max_grid_images]
        # Drawn from the files at tile size: the model's own input may be too small to recognise a card by eye.
        display = [load_image(task_samples[i].path, TILE, prep.background) for i in shown]
        grid = misclassified_grid(
            display,
            [names[true_list[i]] for i in shown],
            [names[predicted[i]] for i in shown],
            max_grid_images,
            [confidence[i] for i in shown],
        )
        Image.fromarray(grid).save(out_dir / f"misclassified_{task}.png")

    report["near_duplicates"] = near_duplicate_section(state, samples, right, near_duplicate_distance)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    write_confusion_summaries(out_dir, summaries, f"{path.name} on {len(samples)} images of {labels_file}")
    (out_dir / "report.md").write_text(markdown(report, state, mistakes, max_grid_images))
    log.info(
        "%s; report in %s",
        "  ".join(f"{t}/top1 {m['top1_acc']:.3f}" for t, m in report["tasks"].items() if "top1_acc" in m),
        out_dir / "report.md",
    )
    return report


def near_duplicate_section(state: Checkpoint, samples: list, right: dict, max_distance: int) -> dict | None:
    """The evaluated images against the checkpoint's training screenshots (read from its training labels
    file, as data); None, with a log line, where those cannot be read here."""
    try:  # the saved config as data: OmegaConf only resolves its ${...} references to other keys
        dataset = OmegaConf.create(state.config).dataset
        training = {s.file: s.path for s in read_labels(dataset.labels_file, dataset.root)}
    except (UserError, OSError, OmegaConfBaseException):  # the training set is not here: the section is left out
        log.info("near-duplicates not reported: the checkpoint's training labels file is not readable here")
        return None
    train_paths = [training[f] for f in state.split.get("train", []) if f in training and training[f].is_file()]
    if not train_paths:
        log.info("near-duplicates not reported: none of the checkpoint's training screenshots is readable here")
        return None
    seen = {p.resolve() for p in train_paths}
    unseen = [s.path for s in samples if s.path.resolve() not in seen]
    hashes = perceptual_hashes({*unseen, *train_paths})
    near = dict(zip(unseen, has_near_duplicate(unseen, train_paths, hashes, max_distance), strict=True))
    without = [p for p in unseen if not near[p]]
    return {
        "max_distance": max_distance,
        "training_images_evaluated": len(samples) - len(unseen),
        "images_not_in_training": len(unseen),
        "share_with": sum(near.values()) / len(unseen) if unseen else float("nan"),
        "images_without": len(without),
        "top1_without": {
            task: sum(by_path[p] for p in without if p in by_path) / n
            if (n := sum(p in by_path for p in without))
            else float("nan")
            for task, by_path in right.items()
        },
    }


def open_set_metrics(scores: torch.Tensor, known: torch.Tensor, correct: torch.Tensor, threshold: float) -> dict:
    """How well the best cosine (`scores`) tells the `known` images from the others, and what the
    threshold does: known images accepted (and also correctly named), unknown ones rejected."""
    from torchmetrics.functional.classification import binary_auroc

    accepted = scores >= threshold
    return {
        "known_images": int(known.sum()),
        "unknown_images": int((~known).sum()),
        "threshold": threshold,
        "auroc": binary_auroc(scores, known.long()).item() if known.any() else float("nan"),
        "known_accepted": accepted[known].float().mean().item() if known.any() else float("nan"),
        "known_accuracy_at_threshold": (accepted & correct)[known].float().mean().item()
        if known.any()
        else float("nan"),
        "unknown_rejected": (~accepted[~known]).float().mean().item(),
    }


def class_indices(task: str, labels: list[str], names: list[str], labels_file, open_set: bool = False) -> torch.Tensor:
    """Each label's class index; with `open_set` (an embedding head), -1 for a class the checkpoint does not know."""
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(labels) - index.keys())
    if open_set:
        return torch.tensor([index.get(label, -1) for label in labels])
    if unknown:
        raise UserError(
            f"task {task}: dataset.labels_file={labels_file} has classes the checkpoint does not know: "
            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}; evaluate a checkpoint "
            f"trained on them, or a labelled set without them"
        )
    return torch.tensor([index[label] for label in labels])


def default_out_dir(checkpoint: Path) -> Path:
    """outputs/evaluate/<date>_<time>_<stem> for a run's checkpoint, outputs/evaluate/<stem> otherwise."""
    if checkpoint.parent.name == "checkpoints":
        run = checkpoint.parent.parent.resolve()
        return Path("outputs/evaluate") / f"{run.parent.name}_{run.name}_{checkpoint.stem}"
    return Path("outputs/evaluate") / checkpoint.stem


def markdown(report: dict, state: Checkpoint, mistakes: dict, max_rows: int) -> str:
    lines = [
        f"# Evaluation of `{report['checkpoint']}`",
        "",
        f"- model: {state.backbone}, epoch {state.progress.epoch}, image size {state.preprocessing.image_size}",
        f"- data: `{report['labels_file']}`, {report['num_images']} original images (augmented ignored)",
    ]
    if report["skipped"]:
        lines.append(f"- skipped {len(report['skipped'])} unreadable images: {', '.join(report['skipped'][:10])}")
    near = report.get("near_duplicates")
    if near:
        lines.append(
            f"- {near['training_images_evaluated']} of the images are the checkpoint's training screenshots; of the "
            f"{near['images_not_in_training']} others, {near['share_with']:.1%} have a near-duplicate among them "
            f"(perceptual hash within {near['max_distance']} bits); top-1 on the {near['images_without']} without: "
            + ", ".join(f"{task} {value:.3f}" for task, value in near["top1_without"].items())
        )
    for task, scores in report["tasks"].items():
        names = state.class_names[task]
        lines += [
            "",
            f"## {task} (field `{state.fields[task]}`, {len(names)} classes)",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {name} | {value:.4f} |" for name, value in scores.items()]
        lines += [
            "",
            f"![confusion matrix](confusion_{task}.png)",
            "",
            "Per class (support, precision, recall, F1, what it is taken for), worst first: "
            "[confusion_summary.md](confusion_summary.md)",
            "",
            f"### Misclassified: {len(mistakes[task])} of {report['num_images']}",
            "",
        ]
        if mistakes[task]:
            lines += [
                f"![misclassified](misclassified_{task}.png)",
                "",
                "| image | true | predicted | probability |",
                "|---|---|---|---|",
            ]
            lines += [f"| {file} | {true} | {pred} | {p:.3f} |" for file, true, pred, p in mistakes[task][:max_rows]]
            if len(mistakes[task]) > max_rows:
                lines.append(f"\n... and {len(mistakes[task]) - max_rows} more")
    for task, o in report["open_set"].items():
        lines += [
            "",
            f"## {task}: cards the checkpoint does not know",
            "",
            f"{o['unknown_images']} images of unknown cards beside {o['known_images']} of known ones (the metrics "
            f'above are the known ones\'). An image is "unknown" when its best cosine to a prototype is below '
            f"{o['threshold']:.3f}.",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [
            f"| {name} | {o[name]:.4f} |"
            for name in ("auroc", "known_accepted", "known_accuracy_at_threshold", "unknown_rejected")
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
