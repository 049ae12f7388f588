"""How an image becomes the model's input, defined once and carried by every checkpoint.

Two stages, the same for validation, `Recognizer`, predict, evaluate and export:

1. `to_square_rgb`: turned upright by its EXIF orientation, 16-bit grey scaled to 8 bits,
   transparency composited on the background colour, then resized to image_size x image_size, as
   uint8 RGB (done once per image, when a dataset is read);
2. the validation pipeline (albumentations on uint8, saved with the checkpoint).

What comes out is a uint8 (H, W, 3) array; the model's own input layer (`model.ImageInput`)
converts and normalises it on the device, so an exported model takes the same uint8 images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I")  # how Pillow opens a 16-bit greyscale PNG


class ImageTooLarge(ValueError):
    """An image beyond Pillow's pixel limit (a possible decompression bomb): a ValueError, so that every
    caller reports it like any other unreadable image."""


def to_square_rgb(image: Image.Image, size: int, background) -> np.ndarray:
    """Upright by its EXIF orientation, 16-bit grey scaled to 8 bits, transparency composited on the
    background colour, then resized to size x size: a uint8 RGB array."""
    image = ImageOps.exif_transpose(image)  # a phone's JPEG stores its pixels sideways, and says so in EXIF
    if image.mode in SIXTEEN_BIT_GREY:
        image = to_8_bit_grey(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        flat = Image.new("RGBA", image.size, (*background, 255))
        flat.alpha_composite(image)
        image = flat
    image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on PIL's read-only view


def to_8_bit_grey(image: Image.Image) -> Image.Image:
    """16-bit grey as 8-bit "L" (or "LA" where the PNG names a transparent grey): Pillow's own
    convert clips every value above 255, so all but the darkest pixels would come out white."""
    values = np.asarray(image).astype(np.int64)
    grey = Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8))
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        grey.putalpha(Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8)))
    return grey


def load_image(path: str | Path, size: int, background) -> np.ndarray:
    """Decode any PNG/JPEG (RGB, RGBA, palette, 8- or 16-bit grey) into a size x size uint8 RGB array."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_square_rgb(image, size, tuple(background))
    except Image.DecompressionBombError as e:  # not an OSError: callers would let it end in a traceback
        raise ImageTooLarge(f"{e} (PIL.Image.MAX_IMAGE_PIXELS)") from None


@dataclass(frozen=True)
class Preprocessing:
    """What a trained model expects of an image: its size, the background that transparency is
    composited on, and the validation pipeline (as `albumentations.to_dict` writes it)."""

    image_size: int
    background: tuple[int, int, int]
    val_transforms: dict

    @classmethod
    def of_run(cls, image_size: int, background, val_pipeline: A.Compose) -> Preprocessing:
        return cls(int(image_size), tuple(int(c) for c in background), A.to_dict(val_pipeline))

    @classmethod
    def from_dict(cls, saved: dict) -> Preprocessing:
        return cls(int(saved["image_size"]), tuple(saved["background"]), saved["val_transforms"])

    def to_dict(self) -> dict:
        """For the checkpoint: plain data only."""
        return {
            "image_size": self.image_size,
            "background": list(self.background),
            "val_transforms": self.val_transforms,
        }

    def pipeline(self) -> A.Compose:
        return A.from_dict(self.val_transforms)

    def square(self, image) -> np.ndarray:
        """Stage 1 for a PIL image, or an HxWx3 / HxWx4 uint8 array."""
        return to_square_rgb(as_pil(image), self.image_size, self.background)

    def load(self, path: str | Path) -> np.ndarray:
        """Stage 1 for an image file."""
        return load_image(path, self.image_size, self.background)


def as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(
                f"expected an HxWx3 (RGB) or HxWx4 (RGBA) uint8 array, got {image.dtype} with shape {image.shape}"
            )
        return Image.fromarray(image, "RGB" if image.shape[2] == 3 else "RGBA")
    raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
