"""Shared fixtures: a tiny, easy labelled dataset in the annotation tool's format, and a runner
that calls `python -m balatro_train` in a subprocess exactly as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NAMES = ["Joker_001", "Joker_002", "The Fool", "Mercury"]
MODIFIERS = ["Base", "Foil", "Negative"]
COLOURS = {"Joker_001": (200, 40, 40), "Joker_002": (40, 200, 40), "The Fool": (40, 40, 200), "Mercury": (200, 200, 40)}


def card_image(name: str, modifier: str, rng: np.random.Generator, size=(36, 48)) -> Image.Image:
    """A flat card whose colour says the name and whose pattern says the modifier: easy to learn."""
    w, h = size
    image = np.zeros((h, w, 3), np.float32) + COLOURS[name]
    if modifier == "Foil":
        image[::4] = (220, 220, 255)
    if modifier == "Negative":
        image = 255 - image
    image += rng.normal(0, 8, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_dataset(root: Path, per_class: int = 4, augmented_per_image: int = 1, seed: int = 0) -> dict:
    """labels.json with full_path relative to `root` (as the annotation tool writes them),
    plus augmented.json of RGBA rotated copies. Returns the paths as dataset.* overrides."""
    rng = np.random.default_rng(seed)
    originals, augmented = {}, {}
    (root / "dataset_default").mkdir(parents=True, exist_ok=True)
    (root / "augmented").mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        for i in range(per_class):
            modifier = MODIFIERS[i % len(MODIFIERS)]
            file = f"{name.replace(' ', '_')}_{i}.png"
            image = card_image(name, modifier, rng)
            image.save(root / "dataset_default" / file)
            originals[file] = {"name": name, "type": "Joker" if "Joker" in name else "Tarot",
                               "rarity": "Common", "modifier": modifier,
                               "full_path": f"dataset_default/{file}"}
            for k in range(augmented_per_image):
                aug_file = f"aug_{k}_{file}"
                image.convert("RGBA").rotate(10 + 5 * k, expand=True).save(root / "augmented" / aug_file)
                augmented[aug_file] = {**originals[file], "full_path": f"augmented/{aug_file}",
                                       "parent": file, "augmentation": f"rotate_{10 + 5 * k}"}
    (root / "dataset_default" / "labels.json").write_text(json.dumps(originals, indent=1))
    (root / "augmented" / "augmented.json").write_text(json.dumps(augmented, indent=1))
    return {"labels_file": root / "dataset_default" / "labels.json",
            "augmented": root / "augmented" / "augmented.json"}


def tiny_overrides(data: dict, root: Path) -> list[str]:
    """A fast, real training run: 32 px images, small batches, a few epochs."""
    return ["dataset=annotated", f"dataset.labels_file={data['labels_file']}",
            f"dataset.augmented_labels_files=[{data['augmented']}]", f"dataset.root={root}",
            "data.image_size=32", "model.pretrained=false", "trainer.batch_size=8", "trainer.epochs=3",
            "trainer.precision=32", "trainer.num_workers=0", "optimizer.lr=3e-3"]


def run_cli(args: list[str], cwd: Path, module: str = "balatro_train", check: bool = True,
            timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def run_dirs(cwd: Path) -> list[Path]:
    """Single-run folders, oldest first (outputs/<date>/<time>/)."""
    return sorted(p for p in (cwd / "outputs").glob("*/*") if (p / ".hydra").is_dir() and "multirun" not in p.parts)


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "labelled"
    return write_dataset(root), root
