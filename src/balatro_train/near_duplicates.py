"""Near-duplicate screenshots, and what a validation figure is worth without them.

Real captures are taken every couple of seconds, so a card's screenshots are often near-identical: a
per-image split then validates on near-copies of training images, and its top-1 says how well the model
remembers rather than how well it recognises. A validation image has a near-duplicate when some training
screenshot's perceptual hash (imagehash.phash: 64 bits from the image's low frequencies, unmoved by
rescaling, compression and small changes of light) is within `max_distance` bits of its own. The quality
report (balatro_train/quality.py) gives, beside each top-1, the top-1 on the validation images without one
and the share that have one.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from balatro_train.preprocessing import load_image

# Bits (of 64) within which two screenshots count as near-duplicates. Re-captures of one unchanged scene
# differ by a few bits; distinct screenshots of one card, with other crops, light and editions, by far more.
DEFAULT_MAX_DISTANCE = 6


def perceptual_hashes(paths: Iterable[Path]) -> dict[Path, np.ndarray]:
    """Each image's 64-bit perceptual hash, as 64 booleans, of the image decoded as training decodes it
    (preprocessing.load_image: EXIF orientation, transparency on black) at 64 px (phash itself works at 32)."""
    return {path: imagehash.phash(Image.fromarray(load_image(path, 64, (0, 0, 0)))).hash.flatten() for path in paths}


def nearest_distances(queries: list[np.ndarray], references: list[np.ndarray]) -> np.ndarray:
    """For each query hash, the Hamming distance to the nearest reference hash (65 when there are none)."""
    if not queries:
        return np.zeros(0, int)
    if not references:
        return np.full(len(queries), 65)
    q, r = np.stack(queries), np.stack(references)
    return (q[:, None, :] != r[None, :, :]).sum(-1).min(axis=1)


def has_near_duplicate(val_paths: list[Path], train_paths: list[Path], hashes: dict, max_distance: int) -> list[bool]:
    """Per validation image, whether a training image lies within `max_distance` bits of it."""
    distances = nearest_distances([hashes[p] for p in val_paths], [hashes[p] for p in train_paths])
    return [bool(d <= max_distance) for d in distances]
