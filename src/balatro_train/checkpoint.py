"""Checkpoints: written atomically, read only with `torch.load(weights_only=True)`.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no pickled
objects), so loading one never runs code from the file.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from balatro_train.errors import UserError

FORMAT = "balatro-train/1"


def save_checkpoint(state: dict, paths: list[Path]) -> None:
    """Serialise once, then write each path atomically (temporary file beside it, fsync, rename),
    so that a kill at any moment leaves the previous file whole."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    for path in paths:
        save_bytes(buffer.getbuffer(), path)


def save_bytes(data, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_file_atomically(source: Path, target: Path) -> None:
    """Publish a checkpoint where downstream tools read it, never leaving a half-copied file."""
    save_bytes(source.read_bytes(), target)


def load_checkpoint(path: str | Path, key: str = "resume") -> dict:
    """Load a balatro-train checkpoint; `key` names the config key that pointed to it, for errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}={path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        pickled_global = re.search(r"GLOBAL ([\w.]+)", str(e))
        if pickled_global:  # a pickled Python object: loading it could run code, so it is never loaded
            raise UserError(f"{key}={path}: refused, the file holds a Python object ({pickled_global[1]}) "
                            f"besides weights and plain data; only load checkpoints written by balatro-train") from None
        raise UserError(f"{key}={path}: damaged or not a checkpoint (it does not unpickle as one); "
                        f"use another file, e.g. an epoch_NNN.pt beside it") from None
    except Exception as e:  # noqa: BLE001  (truncated zip, random bytes, text: torch raises many kinds)
        raise UserError(f"{key}={path}: damaged or not a checkpoint, truncated or corrupt ({type(e).__name__}); "
                        f"use another file, e.g. an epoch_NNN.pt beside it") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{key}={path}: not a balatro-train checkpoint (no '{FORMAT}' format tag)")
    return state


def rng_state() -> dict:
    """Every RNG a run draws from, as weights_only-safe values."""
    np_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
