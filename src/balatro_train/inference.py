"""Recognising cards with a trained checkpoint: the `Recognizer` API and what the CLIs share.

Images are prepared exactly as validation prepared them, by the checkpoint's own preprocessing
(balatro_train/preprocessing.py; never from the current config): transparency composited on the
background colour, resized to image_size x image_size, then the saved validation pipeline; the
model, rebuilt from the checkpoint's own model config, takes the uint8 result as it is.

    from balatro_train.inference import Recognizer
    recognizer = Recognizer.from_checkpoint("data/models/best_model.pt")
    recognizer.predict(pil_or_numpy_image)     # {"identification": [("Joker_001", 0.97), ...], ...}
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from balatro_train.checkpoint import load_checkpoint, model_from_checkpoint, preprocessing_of
from balatro_train.device import resolve_device
from balatro_train.errors import UserError

log = logging.getLogger(__name__)
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def resolve_checkpoint(path: str | Path | None, key: str = "checkpoint") -> Path:
    """A checkpoint file, or a run folder (its checkpoints/best.pt); `key` names the option in errors."""
    if path is None or str(path) == "":
        raise UserError(f"{key}= is required: give a checkpoint file (e.g. data/models/best_model.pt) "
                        f"or a run folder (outputs/<date>/<time>)")
    path = Path(path)
    if path.is_dir():
        best = path / "checkpoints" / "best.pt"
        if not best.is_file():
            raise UserError(f"{key}={path}: a folder without checkpoints/best.pt; give a run folder "
                            f"(outputs/<date>/<time>) or a .pt file")
        return best
    if not path.is_file():
        raise UserError(f"{key}={path}: no such checkpoint file or run folder; check the path")
    return path


class Recognizer:
    """A checkpoint loaded once, for repeated predictions on CPU or GPU."""

    def __init__(self, state: dict, device: str | torch.device = "auto", batch_size: int = 32):
        self.device = resolve_device(device, key="device") if isinstance(device, str) else device
        self.class_names: dict[str, list[str]] = state["class_names"]
        self.fields: dict[str, str] = state["fields"]
        self.preprocessing = preprocessing_of(state)
        self.pipeline = self.preprocessing.pipeline()
        self.batch_size = batch_size
        self.model = model_from_checkpoint(state).to(self.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto",
                        batch_size: int = 32) -> Recognizer:
        """`path`: a checkpoint file or a run folder (its checkpoints/best.pt)."""
        return cls(load_checkpoint(resolve_checkpoint(path), "checkpoint"), device, batch_size)

    @property
    def tasks(self) -> list[str]:
        return list(self.class_names)

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    def prepare(self, image) -> np.ndarray:
        """PIL image or HxWx3/HxWx4 uint8 array -> the size x size uint8 RGB array validation saw."""
        return self.preprocessing.square(image)

    def probabilities(self, images: np.ndarray | Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """Softmax per task for images already squared by `prepare` or `preprocessing.load`
        (N x size x size x 3 uint8), on the CPU."""
        chunks: dict[str, list[torch.Tensor]] = {task: [] for task in self.class_names}
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = torch.stack([torch.from_numpy(np.ascontiguousarray(self.pipeline(image=np.asarray(image))["image"]))
                                     for image in images[start:start + self.batch_size]])
                batch = batch.to(self.device, non_blocking=True)
                for task, logits in self.model(batch).items():
                    chunks[task].append(logits.float().softmax(dim=1).cpu())
        if not len(images):
            return {task: torch.zeros(0, len(names)) for task, names in self.class_names.items()}
        return {task: torch.cat(parts) for task, parts in chunks.items()}

    def predict(self, images, topk: int = 3) -> dict[str, list[tuple[str, float]]] | list[dict]:
        """Top-k (label, probability) per task, best first. One image in, one dict out;
        a list in, a list of dicts out, in the same order."""
        single = not isinstance(images, (list, tuple))
        batch = [self.prepare(image) for image in ([images] if single else images)]
        results = self.top_k(self.probabilities(batch), topk)
        out = [{task: [(self.class_names[task][i], p) for i, p in zip(*top[n])] for task, top in results.items()}
               for n in range(len(batch))]
        return out[0] if single else out

    def top_k(self, probs: dict[str, torch.Tensor], k: int) -> dict[str, list[tuple[list[int], list[float]]]]:
        """{task: [(indices, probabilities) of each image]}, k capped at the number of classes."""
        result = {}
        for task, p in probs.items():
            values, indices = p.topk(min(k, p.shape[1]), dim=1)
            result[task] = list(zip(indices.tolist(), values.tolist()))
        return result


def log_to_stderr() -> None:
    """The CLIs keep stdout for their results (JSON); Hydra's job logging is off in their configs."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr, force=True)
