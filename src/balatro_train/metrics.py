"""Task metrics (torchmetrics, declared in each task's YAML), the confusion summary (per class support,
precision, recall, F1 and what it is mistaken for), and the figures: confusion matrices, misclassified grids."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torchmetrics.classification
from PIL import Image, ImageDraw, ImageFont
from torchmetrics import MeanMetric, Metric, MetricCollection

from balatro_train.errors import UnknownCallable, UserError

TILE, TEXT_HEIGHT, GAP, MAX_COLUMNS = 112, 34, 4, 4  # the misclassified grid's layout, in pixels: at most
# 464 px wide, so that TensorBoard's image cards show it at a readable scale
TITLE_HEIGHT = 20  # its title band ("k of n wrong")
MAX_FIGURE_CLASSES = 10  # a confusion figure with more classes shows the block of the most confused ones
CONFUSED_WITH = 3  # the classes a class is most often mistaken for, in the summary


METRICS_MODULE = "torchmetrics.classification."  # what a task's metrics may name (conf/task/*.yaml)


def build_metrics(task_name: str, metrics_cfg, num_classes: int) -> MetricCollection:
    """Each declared metric (a `_partial_` torchmetrics classification class) for `num_classes`. Built from
    the config as data through `metric_class`, never instantiated: evaluate builds a checkpoint's own."""
    metrics = {}
    for name, cfg in metrics_cfg.items():
        options = {k: v for k, v in dict(cfg).items() if k not in ("_target_", "_partial_")}
        top_k = options.get("top_k")
        if top_k is not None and top_k > num_classes:
            continue  # top-3 over two classes is meaningless (and torchmetrics refuses it)
        try:
            metrics[name] = metric_class(cfg, f"tasks.{task_name}.metrics.{name}")(num_classes=num_classes, **options)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  (a wrong option: torchmetrics raises TypeError or ValueError)
            raise UserError(
                f"tasks.{task_name}.metrics.{name}: cannot build it ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None
    return MetricCollection(metrics)


def metric_class(metric_cfg, key: str) -> type[Metric]:
    """The torchmetrics classification metric class that `metric_cfg._target_` names; nothing else."""
    target = str(metric_cfg.get("_target_"))
    found = getattr(torchmetrics.classification, target.removeprefix(METRICS_MODULE), None)
    if not target.startswith(METRICS_MODULE) or not (isinstance(found, type) and issubclass(found, Metric)):
        raise UnknownCallable(key, target, [f"{METRICS_MODULE}<Metric>"])
    return found


def scalars_and_matrices(results: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """A task's computed metrics as scalars (for metrics.jsonl and TensorBoard scalars) and matrices
    (for figures)."""
    scalars, matrices = {}, {}
    for name, value in results.items():
        if value.numel() == 1:
            scalars[name] = value.item()
        else:
            matrices[name] = value.cpu()
    return scalars, matrices


# ---- the confusion summary: what a matrix of 180 classes can't show ------------------------------------


def confusion_counts(true, predicted, num_classes: int) -> np.ndarray:
    """The confusion matrix as counts, rows: true class, columns: predicted class."""
    true, predicted = np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    return np.bincount(true * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def confusion_summary(matrix, class_names: list[str]) -> list[dict]:
    """One row per class that was validated or predicted: support (its validation images), precision,
    recall, F1 and the classes its images were most often taken for, worst F1 first (then the larger
    support first). Precision is None for a class never predicted."""
    m = np.asarray(matrix, dtype=np.int64)
    support, predicted, right = m.sum(axis=1), m.sum(axis=0), np.diag(m)
    rows = []
    for c, name in enumerate(class_names):
        if support[c] == 0 and predicted[c] == 0:
            continue
        precision = right[c] / predicted[c] if predicted[c] else None
        recall = right[c] / support[c] if support[c] else None
        f1 = (2 * right[c] / (support[c] + predicted[c])) if support[c] + predicted[c] else 0.0
        mistaken = [(int(m[c, o]), class_names[o]) for o in np.argsort(-m[c], kind="stable") if o != c and m[c, o] > 0][
            :CONFUSED_WITH
        ]
        rows.append(
            {
                "class": name,
                "support": int(support[c]),
                "precision": precision,
                "recall": recall,
                "f1": float(f1),
                "confused_with": [(other, count) for count, other in mistaken],
            }
        )
    return sorted(rows, key=lambda r: (r["f1"], -r["support"], r["class"]))


def confusion_summary_markdown(rows: list[dict], max_rows: int | None = None) -> str:
    """The summary as a markdown table (TensorBoard's text dashboard and confusion_summary.md)."""

    def number(value):
        return "–" if value is None else f"{value:.3f}"

    shown = rows if max_rows is None else rows[:max_rows]
    lines = ["| class | support | precision | recall | F1 | most often mistaken for |", "|---|---:|---:|---:|---:|---|"]
    lines += [
        f"| {md(r['class'])} | {r['support']} | {number(r['precision'])} | {number(r['recall'])} | "
        f"{r['f1']:.3f} | {', '.join(f'{md(o)} ({n})' for o, n in r['confused_with']) or '–'} |"
        for r in shown
    ]
    if len(shown) < len(rows):
        lines.append(f"\n... and {len(rows) - len(shown)} classes more, all with F1 {shown[-1]['f1']:.3f} or better")
    return "\n".join(lines)


def write_confusion_summaries(folder: Path, summaries: dict[str, list[dict]], what: str) -> None:
    """confusion_summary.md (a table per task, worst class first) and confusion_summary.csv."""
    parts = [
        f"# Confusion summary ({what})",
        "",
        "Per class: its validation images (support), precision, recall, F1 and the classes its images "
        "were most often taken for, worst F1 first.",
    ]
    for task, rows in summaries.items():
        parts += ["", f"## {task}", "", confusion_summary_markdown(rows)]
    (folder / "confusion_summary.md").write_text("\n".join(parts) + "\n")
    (folder / "confusion_summary.csv").write_text(confusion_summary_csv(summaries))


def confusion_summary_csv(summaries: dict[str, list[dict]]) -> str:
    """Every task's summary as one CSV: task, class, support, precision, recall, f1, confused_with
    ("Foil:3; Negative:1")."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["task", "class", "support", "precision", "recall", "f1", "confused_with"])
    for task, rows in summaries.items():
        for r in rows:
            writer.writerow(
                [
                    task,
                    r["class"],
                    r["support"],
                    "" if r["precision"] is None else f"{r['precision']:.4f}",
                    "" if r["recall"] is None else f"{r['recall']:.4f}",
                    f"{r['f1']:.4f}",
                    "; ".join(f"{o}:{n}" for o, n in r["confused_with"]),
                ]
            )
    return out.getvalue()


def md(text: str) -> str:
    return str(text).replace("|", "\\|")


# ---- figures ----------------------------------------------------------------------------------------


def most_confused(matrix: np.ndarray, k: int) -> list[int]:
    """The `k` classes with the most errors, made or received (ties: the larger support), worst first."""
    m = np.asarray(matrix, dtype=np.int64)
    errors = m.sum(axis=0) + m.sum(axis=1) - 2 * np.diag(m)
    return sorted(range(len(m)), key=lambda c: (-errors[c], -m[c].sum(), c))[:k]


def confusion_figure(matrix, class_names: list[str], title: str, max_classes: int = MAX_FIGURE_CLASSES):
    """A confusion matrix (rows: true class, columns: predicted class) with its counts written in the
    cells, sized to be read where it is shown (TensorBoard's image card, a report). Beyond
    `max_classes` classes it shows the block of the `max_classes` most confused ones, worst first, and
    says so in its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix.cpu() if isinstance(matrix, torch.Tensor) else matrix, dtype=np.int64)
    shown = list(range(len(m)))
    if len(m) > max_classes:
        shown = most_confused(m, max_classes)
        title = f"{title}\nthe {max_classes} most confused of {len(m)} classes"
    block = m[np.ix_(shown, shown)]
    labels = [short(class_names[c]) for c in shown]
    size = 2.2 + 0.22 * len(shown)  # inches at 100 dpi: at most 420 px, about as wide as TensorBoard's cards
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ax.imshow(block, cmap="Blues", vmin=0, vmax=max(1, block.max()))
    for i in range(len(shown)):
        for j in range(len(shown)):
            if block[i, j]:
                ax.text(
                    j,
                    i,
                    str(block[i, j]),
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if block[i, j] > 0.6 * block.max() else "black",
                )
    ax.set_xticks(range(len(shown)), labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(range(len(shown)), labels, fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def short(name: str, length: int = 18) -> str:
    return name if len(name) <= length else name[: length - 1] + "…"


def misclassified_grid(
    images_uint8,
    true_labels: list[str],
    predicted_labels: list[str],
    max_images: int = 32,
    confidences: list[float] | None = None,
) -> np.ndarray:
    """A grid (HxWx3 uint8) of the images whose true label differs from the predicted one, the first
    `max_images` of them, under a title "k of n wrong", with "true" and "pred" (and the prediction's
    probability, given `confidences`) written under each. Images: N x H x W x 3 uint8 (or a list of such
    arrays, any sizes). For TensorBoard: writer.add_image(tag, grid, step, dataformats="HWC")."""
    confidences = [None] * len(true_labels) if confidences is None else list(confidences)
    wrong = [
        (image, t, p, c)
        for image, t, p, c in zip(images_uint8, true_labels, predicted_labels, confidences, strict=True)
        if str(t) != str(p)
    ]
    picked = wrong[:max_images]
    font = default_font()
    columns = max(2 if not picked else 1, min(MAX_COLUMNS, len(picked)))
    rows = max(1, -(-len(picked) // columns))
    width = columns * (TILE + GAP)
    canvas = Image.new("RGB", (width, TITLE_HEIGHT + rows * (TILE + TEXT_HEIGHT + GAP)), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    title = f"{len(wrong)} of {len(true_labels)} wrong" + (
        f", first {len(picked)} shown" if len(picked) < len(wrong) else ""
    )
    draw.text((2, 3), fit(title, font, width - 4), fill=(240, 240, 240), font=font)
    if not picked:
        draw.text(
            (4, TITLE_HEIGHT + TILE // 2),
            fit("no misclassified images", font, width - 8),
            fill=(220, 220, 220),
            font=font,
        )
    for n, (image, true, pred, confidence) in enumerate(picked):
        x, y = (n % columns) * (TILE + GAP), TITLE_HEIGHT + (n // columns) * (TILE + TEXT_HEIGHT + GAP)
        tile = Image.fromarray(np.asarray(image, dtype=np.uint8))
        # Upscale small training-size images without blurring them into mush.
        small = max(tile.size) < TILE
        canvas.paste(
            tile.resize((TILE, TILE), Image.Resampling.NEAREST if small else Image.Resampling.BILINEAR), (x, y)
        )
        draw.text((x + 2, y + TILE + 2), fit(f"true {true}", font), fill=(140, 230, 140), font=font)
        score = "" if confidence is None else f" {confidence:.2f}"
        label = fit(f"pred {pred}", font, TILE - 4 - int(font.getlength(score)))
        draw.text((x + 2, y + TILE + 18), label + score, fill=(250, 130, 130), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def default_font():
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def fit(text: str, font, width: int = TILE - 4) -> str:
    """Cut `text` to the tile's width, marking the cut."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def new_loss_means(loss_fns, device) -> dict[str, MeanMetric]:
    # "disable": no NaN check, which would read the loss back every step; a NaN still shows in the mean.
    return {task: MeanMetric(nan_strategy="disable").to(device) for task in loss_fns}
