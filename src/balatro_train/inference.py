"""Recognising cards with a trained checkpoint: the `Recognizer` API and what the CLIs share.

Images are prepared exactly as validation prepared them, from the checkpoint's own
"preprocessing" entry (never from the current config): flatten transparency on the
background colour, resize to image_size x image_size, then the saved validation pipeline.

    from balatro_train.inference import Recognizer
    recognizer = Recognizer.from_checkpoint("data/models/best_model.pt")
    recognizer.predict(pil_or_numpy_image)     # {"identification": [("Joker_001", 0.97), ...], ...}
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from PIL import Image

from balatro_train.checkpoint import load_checkpoint
from balatro_train.data import flatten_image
from balatro_train.errors import UserError
from balatro_train.model import CardNet
from balatro_train.device import resolve_device

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


def build_model(state: dict) -> CardNet:
    """The checkpoint's CardNet in eval mode, on the CPU."""
    num_classes = {task: len(names) for task, names in state["class_names"].items()}
    model = CardNet(state["config"]["model"]["backbone"], num_classes=num_classes, pretrained=False)
    model.load_state_dict(state["model"])
    return model.eval()


def as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"expected an HxWx3 (RGB) or HxWx4 (RGBA) uint8 array, got {image.dtype} "
                             f"with shape {image.shape}")
        return Image.fromarray(image, "RGB" if image.shape[2] == 3 else "RGBA")
    raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


class Recognizer:
    """A checkpoint loaded once, for repeated predictions on CPU or GPU."""

    def __init__(self, state: dict, device: str | torch.device = "auto", batch_size: int = 32):
        self.device = resolve_device(device, key="device") if isinstance(device, str) else device
        self.class_names: dict[str, list[str]] = state["class_names"]
        self.fields: dict[str, str] = state["fields"]
        prep = state["preprocessing"]
        self.image_size, self.background = int(prep["image_size"]), tuple(prep["background"])
        self.pipeline = A.from_dict(prep["val_transforms"])
        self.batch_size = batch_size
        # channels_last: the faster convolution layout on CPU (oneDNN) and on tensor cores, as in training.
        self.model = build_model(state).to(self.device, memory_format=torch.channels_last)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto",
                        batch_size: int = 32) -> Recognizer:
        """`path`: a checkpoint file or a run folder (its checkpoints/best.pt)."""
        return cls(load_checkpoint(resolve_checkpoint(path), "checkpoint"), device, batch_size)

    @property
    def tasks(self) -> list[str]:
        return list(self.class_names)

    def prepare(self, image) -> np.ndarray:
        """PIL image or HxWx3/HxWx4 uint8 array -> the size x size uint8 RGB array validation saw."""
        return flatten_image(as_pil(image), self.image_size, self.background)

    def probabilities(self, images: np.ndarray | Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """Softmax per task for already prepared uint8 images (N x size x size x 3), on the CPU."""
        chunks: dict[str, list[torch.Tensor]] = {task: [] for task in self.class_names}
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = torch.stack([self.pipeline(image=np.asarray(image))["image"]
                                     for image in images[start:start + self.batch_size]])
                batch = batch.to(self.device, non_blocking=True, memory_format=torch.channels_last)
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
