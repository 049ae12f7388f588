"""The images an `images=` option names: an image file, a folder (its images, not recursive), a glob
(`**` recurses), or a list of these (predict, enroll)."""

from __future__ import annotations

import glob
from pathlib import Path

from omegaconf import ListConfig

from balatro_train.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def find_images(spec) -> list[Path]:
    """The image files `spec` names, sorted within each folder or glob; a spec that names none is a UserError."""
    if spec is None or spec == "":
        raise UserError(
            "images= is required: give an image file, a folder of images or a quoted glob such as 'shots/*.png'"
        )
    if isinstance(spec, (list, ListConfig)):
        return [path for item in spec for path in find_images(item)]
    path = Path(str(spec))
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise UserError(f"images={spec}: the folder holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return found
    found = sorted(
        Path(p)
        for p in glob.glob(str(spec), recursive=True)
        if Path(p).suffix.lower() in IMAGE_SUFFIXES and Path(p).is_file()
    )
    if not found:
        raise UserError(
            f"images={spec}: no image matched; give an existing image file, a folder or a glob such as 'shots/*.png'"
        )
    return found
