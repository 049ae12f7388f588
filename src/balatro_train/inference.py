"""Recognising cards with a trained checkpoint: the `Recognizer` API and what the CLIs share.

Images are prepared exactly as validation prepared them, by the checkpoint's own preprocessing
(balatro_train/preprocessing.py; never from the current config): transparency composited on the
background colour, resized to image_size x image_size, then the saved validation pipeline; the
model, rebuilt from the checkpoint's own model config, takes the uint8 result as it is.

    from balatro_train.inference import Recognizer
    recognizer = Recognizer.from_checkpoint("data/models/best_model.pt")
    recognizer.predict(pil_or_numpy_image)     # {"identification": [("Joker_001", 0.97), ...], ...}

A task with an embedding head (tasks.<task>.head=cosine) also says "unknown": when the image's best
cosine to the class prototypes is below the checkpoint's calibrated threshold (or `unknown_threshold`),
`predict` returns ("unknown", that cosine) first, then the nearest known cards.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from balatro_train.checkpoint import Checkpoint, load_checkpoint
from balatro_train.device import resolve_device
from balatro_train.embedding import UNKNOWN, embeddings
from balatro_train.errors import UserError

log = logging.getLogger(__name__)
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def resolve_checkpoint(path: str | Path | None, key: str = "checkpoint") -> Path:
    """A checkpoint file, or a run folder (its checkpoints/best.pt); `key` names the option in errors."""
    if path is None or str(path) == "":
        raise UserError(
            f"{key}= is required: give a checkpoint file (e.g. data/models/best_model.pt) "
            f"or a run folder (outputs/<date>/<time>)"
        )
    path = Path(path)
    if path.is_dir():
        best = path / "checkpoints" / "best.pt"
        if not best.is_file():
            raise UserError(
                f"{key}={path}: a folder without checkpoints/best.pt; give a run folder "
                f"(outputs/<date>/<time>) or a .pt file"
            )
        return best
    if not path.is_file():
        raise UserError(f"{key}={path}: no such checkpoint file or run folder; check the path")
    return path


class Recognizer:
    """A checkpoint loaded once, for repeated predictions on CPU or GPU.

    `unknown_threshold` replaces the checkpoint's calibrated max-cosine thresholds of its embedding
    heads (-1: never "unknown")."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        unknown_threshold: float | None = None,
    ):
        self.device = resolve_device(device, key="device") if isinstance(device, str) else device
        self.class_names: dict[str, list[str]] = checkpoint.class_names
        self.fields: dict[str, str] = checkpoint.fields
        self.preprocessing = checkpoint.preprocessing
        self.pipeline = self.preprocessing.pipeline()
        self.batch_size = batch_size
        self.model = checkpoint.model().to(self.device)
        self.scales = {task: checkpoint.head_scale(task) for task in checkpoint.embedding_tasks}
        saved = checkpoint.unknown_thresholds
        self.thresholds = {
            task: saved.get(task, -1.0) if unknown_threshold is None else unknown_threshold for task in self.scales
        }

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        unknown_threshold: float | None = None,
    ) -> Recognizer:
        """`path`: a checkpoint file or a run folder (its checkpoints/best.pt)."""
        return cls(load_checkpoint(resolve_checkpoint(path), "checkpoint"), device, batch_size, unknown_threshold)

    @property
    def tasks(self) -> list[str]:
        return list(self.class_names)

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    def prepare(self, image) -> np.ndarray:
        """PIL image or HxWx3/HxWx4 uint8 array -> the size x size uint8 RGB array validation saw."""
        return self.preprocessing.square(image)

    def logits(self, images: np.ndarray | Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """The model's logits per task for images already squared by `prepare` or `preprocessing.load`
        (N x size x size x 3 uint8), on the CPU."""
        if not len(images):
            return {task: torch.zeros(0, len(names)) for task, names in self.class_names.items()}
        chunks: dict[str, list[torch.Tensor]] = {task: [] for task in self.class_names}
        for batch in self.batches(images):
            for task, logits in self.model(batch).items():
                chunks[task].append(logits.float().cpu())
        return {task: torch.cat(parts) for task, parts in chunks.items()}

    def probabilities(self, images: np.ndarray | Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """Softmax per task, as `logits`."""
        return {task: logits.softmax(dim=1) for task, logits in self.logits(images).items()}

    def embeddings(self, images: np.ndarray | Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """Per embedding-head task, the (N, D) embeddings its prototypes are compared with."""
        chunks = [embeddings(self.model, batch) for batch in self.batches(images)]
        return {task: torch.cat([chunk[task].cpu() for chunk in chunks]) for task in self.scales}

    def batches(self, images):
        """The images through the validation pipeline, as uint8 batches on the device."""
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = torch.stack(
                    [
                        torch.from_numpy(np.ascontiguousarray(self.pipeline(image=np.asarray(image))["image"]))
                        for image in images[start : start + self.batch_size]
                    ]
                )
                yield batch.to(self.device, non_blocking=True)

    def max_cosines(self, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per embedding-head task, each image's best cosine to a class prototype: the "unknown" score."""
        return {task: logits[task].max(dim=1).values / scale for task, scale in self.scales.items()}

    def predict(self, images, topk: int = 3) -> dict[str, list[tuple[str, float]]] | list[dict]:
        """Top-k (label, probability) per task, best first; for an embedding-head task whose best cosine
        is below the threshold, ("unknown", that cosine) first. One image in, one dict out; a list in,
        a list of dicts out, in the same order."""
        single = not isinstance(images, (list, tuple))
        batch = [self.prepare(image) for image in ([images] if single else images)]
        logits = self.logits(batch)
        results = self.top_k({task: values.softmax(dim=1) for task, values in logits.items()}, topk)
        scores = self.max_cosines(logits)
        out = []
        for n in range(len(batch)):
            labels = {
                task: [(self.class_names[task][i], p) for i, p in zip(*top[n], strict=True)]
                for task, top in results.items()
            }
            for task, score in scores.items():
                if score[n] < self.thresholds[task]:
                    labels[task].insert(0, (UNKNOWN, score[n].item()))
            out.append(labels)
        return out[0] if single else out

    def top_k(self, probs: dict[str, torch.Tensor], k: int) -> dict[str, list[tuple[list[int], list[float]]]]:
        """{task: [(indices, probabilities) of each image]}, k capped at the number of classes."""
        result = {}
        for task, p in probs.items():
            values, indices = p.topk(min(k, p.shape[1]), dim=1)
            result[task] = list(zip(indices.tolist(), values.tolist(), strict=True))
        return result


def log_to_stderr() -> None:
    """The CLIs keep stdout for their results (JSON); Hydra's job logging is off in their configs."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr, force=True)
