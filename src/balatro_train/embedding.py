"""Embedding heads: a task whose classes are prototypes in an embedding space, so that a card the
model never trained on can be enrolled from a few screenshots and a card it does not know can be
told apart ("unknown").

* `CosineClassifier`: logits are `scale` x the cosine between the image's embedding (the backbone
  feature centred by a BatchNorm without learned affine, then L2-normalised) and each class's
  L2-normalised weight row (the class prototype).
* `MarginCrossEntropyLoss`: CosFace's margin, taken off the true class's cosine while training, so
  that classes end up separated by at least that much; validation keeps it, so its loss is the same
  quantity every epoch.
* `unknown_threshold`: the calibrated rejection score, the max cosine that `accept` of the known
  validation images reach; below it an image is "unknown".
* `imprint`: a class's prototype from embeddings of its screenshots (weight imprinting, Qi et al.
  2018): the mean of their normalised embeddings. Adding it needs no training step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

UNKNOWN = "unknown"


class CosineClassifier(nn.Module):
    """A head whose weight rows are class prototypes: logits = scale * cos(embedding, prototype).

    The embedding is the backbone feature centred by `neck`, a BatchNorm1d without affine parameters
    (re-identification's "BNNeck"): pooled CNN features are all positive, so uncentred they share
    one large common direction that leaves every cosine alike. `scale` is fixed (a learned one tends
    to grow and undo the normalisation); it is a buffer, so that checkpoints and exported models
    carry it: a deployment gets the cosine back as logit / scale.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 16.0, margin: float = 0.0):
        super().__init__()
        self.neck = nn.BatchNorm1d(in_features, affine=False)
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.margin = margin  # of the cosine; MarginCrossEntropyLoss applies it

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(self.embed(features), F.normalize(self.weight.float(), dim=1))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The image's embedding: what the prototypes are compared with, and imprinted from."""
        return F.normalize(self.neck(features.float()), dim=1)


def is_embedding_head(head: nn.Module) -> bool:
    return isinstance(head, CosineClassifier)


IGNORE = -100  # the target of an image a task does not learn from (torch's ignore_index)


class MarginCrossEntropyLoss(nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss (class weights, label smoothing, the mean over images) over logits whose true
    class is lowered by `margin` first (CosFace: `margin` is the cosine margin times the head's scale;
    0 for a linear head). Targets IGNORE count for nothing (a modifier label on a recoloured image,
    data.recolour), and a batch of only those gives 0 where torch's mean would give NaN."""

    def __init__(self, margin: float = 0.0, **options):
        super().__init__(ignore_index=IGNORE, **options)
        self.margin = margin

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        learns = target != IGNORE
        true_class = torch.where(learns, target, 0)
        if self.margin:
            logits = logits - self.margin * (F.one_hot(true_class, logits.shape[1]) * learns[:, None]).to(logits.dtype)
        per_image = F.cross_entropy(
            logits,
            target,
            weight=self.weight,
            ignore_index=IGNORE,
            reduction="none",
            label_smoothing=self.label_smoothing,
        )
        # torch's weighted mean, without a host sync to test for an empty batch
        weights = learns.to(per_image.dtype) if self.weight is None else self.weight[true_class] * learns
        return per_image.sum() / weights.sum().clamp(min=1e-12)


def task_loss(head: nn.Module, weight: torch.Tensor | None, label_smoothing: float) -> nn.Module:
    """The loss of a task's head: cross-entropy, with CosFace's margin for a cosine head that has one."""
    margin = float(head.margin * head.scale) if is_embedding_head(head) else 0.0
    return MarginCrossEntropyLoss(margin, weight=weight, label_smoothing=label_smoothing)


def unknown_threshold(max_cosines: torch.Tensor, accept: float) -> float:
    """The max-cosine score below which an image is "unknown": the one that `accept` (e.g. 0.95) of the
    known validation images reach or exceed."""
    return torch.quantile(max_cosines.float().cpu(), 1.0 - accept).item()


def unknown_thresholds(heads: nn.ModuleDict, top_logits: dict[str, torch.Tensor], tasks_cfg) -> dict[str, float]:
    """Per embedding-head task, the calibrated "unknown" threshold from the validation images' top
    logits (scale x max cosine) and tasks.<task>.accept_known."""
    return {
        task: unknown_threshold(top_logits[task] / head.scale.item(), tasks_cfg[task].accept_known)
        for task, head in heads.items()
        if is_embedding_head(head) and len(top_logits[task])
    }


def imprint(embeddings: torch.Tensor) -> torch.Tensor:
    """A prototype from the (N, D) embeddings of one class's screenshots (`CosineClassifier.embed`'s,
    unit length): their mean. The head normalises it; keeping its length lets later screenshots be
    averaged in exactly."""
    return embeddings.float().mean(dim=0)


def embeddings(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per embedding-head task, the embeddings of uint8 (N, H, W, 3) images."""
    features = model.backbone(model.input(images))
    return {task: head.embed(features) for task, head in model.heads.items() if is_embedding_head(head)}
