"""Task metrics (torchmetrics, declared in each task's YAML) and their TensorBoard figures."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from hydra.utils import instantiate
from PIL import Image, ImageDraw, ImageFont
from torchmetrics import MetricCollection

from balatro_train.errors import UserError

TILE, TEXT_HEIGHT, GAP, MAX_COLUMNS = 112, 30, 4, 8  # the misclassified grid's layout, in pixels


def build_metrics(task_name: str, metrics_cfg, num_classes: int) -> MetricCollection:
    """Instantiate each declared metric (a `_partial_` torchmetrics class) for `num_classes`."""
    metrics = {}
    for name, cfg in metrics_cfg.items():
        try:
            factory = instantiate(cfg)
        except Exception as e:
            raise UserError(f"tasks.{task_name}.metrics.{name}: cannot build it "
                            f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
        top_k = cfg.get("top_k")
        if top_k is not None and top_k > num_classes:
            continue  # top-3 over two classes is meaningless (and torchmetrics refuses it)
        metrics[name] = factory(num_classes=num_classes)
    return MetricCollection(metrics)


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


def confusion_figure(matrix: torch.Tensor, class_names: list[str], title: str):
    """torchmetrics' confusion-matrix plot (rows: true class, columns: predicted class), sized for
    its classes, counts written in the cells up to 20 classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchmetrics.utilities.plot import plot_confusion_matrix

    size = min(4 + 0.35 * len(class_names), 30)
    fig, ax = plt.subplots(figsize=(size, size))
    with warnings.catch_warnings():  # matplotlib asks the tensor for numpy's copy= keyword: noise, not news
        warnings.simplefilter("ignore", DeprecationWarning)
        plot_confusion_matrix(matrix, ax=ax, add_text=len(class_names) <= 20, labels=class_names, cmap="Blues")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig


def misclassified_grid(images_uint8, true_labels: list[str], predicted_labels: list[str],
                       max_images: int = 32) -> np.ndarray:
    """A grid (HxWx3 uint8) of the images whose true label differs from the predicted one, the first
    `max_images` of them, with "true" and "pred" written under each. Images: N x H x W x 3 uint8
    (or a list of such arrays, any sizes). For TensorBoard: writer.add_image(tag, grid, step, dataformats="HWC")."""
    picked = [(image, t, p) for image, t, p in zip(images_uint8, true_labels, predicted_labels)
              if str(t) != str(p)][:max_images]
    font = default_font()
    columns = max(1, min(MAX_COLUMNS, len(picked)))
    rows = max(1, -(-len(picked) // columns))
    canvas = Image.new("RGB", (columns * (TILE + GAP), rows * (TILE + TEXT_HEIGHT + GAP)), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    if not picked:
        draw.text((4, TILE // 2), "no misclassified images", fill=(220, 220, 220), font=font)
    for n, (image, true, pred) in enumerate(picked):
        x, y = (n % columns) * (TILE + GAP), (n // columns) * (TILE + TEXT_HEIGHT + GAP)
        tile = Image.fromarray(np.asarray(image, dtype=np.uint8))
        # Upscale small training-size images without blurring them into mush.
        small = max(tile.size) < TILE
        canvas.paste(tile.resize((TILE, TILE), Image.Resampling.NEAREST if small else Image.Resampling.BILINEAR),
                     (x, y))
        draw.text((x + 2, y + TILE + 2), fit(f"true {true}", font), fill=(140, 230, 140), font=font)
        draw.text((x + 2, y + TILE + 15), fit(f"pred {pred}", font), fill=(250, 130, 130), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def default_font():
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def fit(text: str, font, width: int = TILE - 4) -> str:
    """Cut `text` to the tile's width, marking the cut."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"
