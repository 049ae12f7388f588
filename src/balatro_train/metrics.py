"""Task metrics (torchmetrics, declared in each task's YAML) and their TensorBoard figures."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from torchmetrics import MetricCollection

from balatro_train.errors import UserError


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


def split_results(results: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Scalars (go to metrics.jsonl and TensorBoard scalars) apart from matrices (figures)."""
    scalars, matrices = {}, {}
    for name, value in results.items():
        if value.numel() == 1:
            scalars[name] = value.item()
        else:
            matrices[name] = value.cpu()
    return scalars, matrices


def confusion_figure(matrix: torch.Tensor, class_names: list[str], title: str):
    """A labelled confusion-matrix figure (rows: true class, columns: predicted class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    size = min(4 + 0.35 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(class_names, rotation=90, fontsize=8)
    ax.set_yticklabels(class_names, fontsize=8)
    if n <= 20:
        for (i, j), count in zip(torch.cartesian_prod(torch.arange(n), torch.arange(n)).tolist(),
                                 matrix.flatten().tolist()):
            ax.text(j, i, str(int(count)), ha="center", va="center", fontsize=7,
                    color="white" if count > matrix.max().item() / 2 else "black")
    fig.tight_layout()
    return fig
