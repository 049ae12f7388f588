"""Checkpoints: what one holds (`training_checkpoint`), how it is written (atomically) and read
(`load_checkpoint`, only with `torch.load(weights_only=True)`), and the model it describes
(`model_from_checkpoint`, rebuilt from the checkpoint's own `model` config).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no pickled
objects), and its saved config is data: the model, heads and metrics it describes are built through
balatro-train's own constructors, and a config naming anything else is refused on loading. So loading
a checkpoint never runs code from the file.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from balatro_train.errors import UnknownCallable, UserError
from balatro_train.metrics import metric_class
from balatro_train.model import build_model, head_configs, head_factories, model_options
from balatro_train.preprocessing import Preprocessing

# 2: the model normalises its uint8 input itself (model.ImageInput); format 1 models expected their
# validation pipeline to normalise, so they cannot be used the new way.
FORMAT = "balatro-train/2"
log = logging.getLogger("balatro_train")


@dataclass
class Progress:
    """How far a run has come: what a resume restores besides the weights and the optimizer."""

    epoch: int = 0                    # the last finished epoch
    best_val_loss: float = math.inf
    bad_epochs: int = 0               # epochs since the best one, for early stopping
    history: list[dict] = field(default_factory=list)   # metrics.jsonl's rows so far
    partial_epoch: dict | None = None  # an interrupted epoch: {"seen": images, "loss_sums": {task: [sum, count]}}

    @classmethod
    def of(cls, state: dict) -> Progress:
        return cls(state["epoch"], state["best_val_loss"], state["bad_epochs"], state["history"],
                   state["partial_epoch"])

    def record(self, row: dict) -> bool:
        """Add a finished epoch; returns whether its combined validation loss is the best so far."""
        self.epoch = row["epoch"]
        self.history.append(row)
        improved = row["val_loss"] < self.best_val_loss
        self.best_val_loss, self.bad_epochs = (row["val_loss"], 0) if improved else (self.best_val_loss,
                                                                                    self.bad_epochs + 1)
        return improved


def training_checkpoint(cfg, progress: Progress, model: nn.Module, optimizer, scheduler, scaler, data,
                        averaged=None, unknown_thresholds: dict[str, float] | None = None) -> dict:
    """Everything a checkpoint holds: enough to resume the run exactly, and to use the model
    (its config, class names, task fields and preprocessing) without the run's config files.
    `model` holds the weights that were validated: the EMA where the run keeps one
    (trainer.ema_decay), whose training weights are then `training_weights`, to resume from.
    `unknown_thresholds`: per embedding-head task, the max cosine below which an image is "unknown",
    calibrated on the validation images by the last validation of these weights."""
    return {"format": FORMAT, "epoch": progress.epoch, "partial_epoch": progress.partial_epoch,
            "best_val_loss": progress.best_val_loss, "bad_epochs": progress.bad_epochs, "history": progress.history,
            "model": (averaged.module if averaged else model).state_dict(),
            "training_weights": model.state_dict() if averaged else None,
            "averaged_steps": int(averaged.n_averaged) if averaged else 0,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng_state(),
            "class_names": data.class_names, "fields": {task: t.field for task, t in cfg.tasks.items()},
            "split": data.split, "pretrained_loaded": model.pretrained_loaded,
            "config": OmegaConf.to_container(cfg, resolve=True), "preprocessing": data.preprocessing.to_dict(),
            "unknown_thresholds": dict(unknown_thresholds or {})}


def model_from_checkpoint(state: dict) -> nn.Module:
    """The checkpoint's model, rebuilt from its own `model` config and heads with its weights, in eval mode."""
    return build_model(state["config"]["model"], state["class_names"], state["model"],
                       head_factories(state["config"])).eval()


def preprocessing_of(state: dict) -> Preprocessing:
    return Preprocessing.from_dict(state["preprocessing"])


def save_checkpoint(state: dict, paths: list[Path]) -> None:
    """Serialise once, then write each path atomically (temporary file beside it, fsync, rename),
    so that a kill at any moment leaves the previous file whole."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    for path in paths:
        save_bytes(buffer.getbuffer(), path)


def save_bytes(data, path: Path) -> None:
    """Write `data` to `path` through a temporary file beside it, fsynced, renamed over `path`, and the
    folder fsynced so that the rename itself survives a crash. A full disk or a folder that cannot be
    written is a UserError: `path` as it was before stays whole, and no temporary file is left."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_folder(path.parent)
    except OSError as e:
        before = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise UserError(f"{path}: could not be written ({e.strerror or type(e).__name__}); {before}. Free some "
                        f"disk space or fix the folder's permissions, then run again") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def fsync_folder(folder: Path) -> None:
    if os.name == "nt":  # Windows cannot open a folder for fsync; NTFS journals the rename itself
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    if isinstance(state, dict) and state.get("format") == "balatro-train/1":
        raise UserError(f"{key}={path}: written by an older balatro-train (format 1, whose models took images "
                        f"normalised by the pipeline); retrain it with this version")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{key}={path}: not a balatro-train checkpoint (no '{FORMAT}' format tag)")
    check_builds_only_what_balatro_train_builds(state, path, key)
    if key == "resume" and state.get("enrolled"):
        raise UserError(f"resume={path}: cards were enrolled into this checkpoint (balatro_train.enroll), so it no "
                        f"longer continues its run; start a new run from it with init_from={path}")
    return state


def check_builds_only_what_balatro_train_builds(state: dict, path: Path, key: str) -> None:
    """A checkpoint's config is data: the model, heads and metrics it describes are looked up among
    balatro-train's own (model.MODEL_TARGET, model.HEAD_CLASSES, metrics.metric_class) and built with its
    numbers and names as arguments, and its validation pipeline among albumentations' registered
    transforms. Anything else it names is refused here, before any tool builds anything."""
    config = state.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(f"{key}={path}: not a balatro-train checkpoint (it holds no model config)")
    try:
        model_options(config["model"])
        head_factories(config)
        for task, task_cfg in (config.get("tasks") or {}).items():
            for name, metric in (task_cfg.get("metrics") or {}).items():
                metric_class(metric, f"tasks.{task}.metrics.{name}")
    except UnknownCallable as e:
        raise UserError(f"{key}={path}: refused, its config names {e.target} ({e.key}), which balatro-train never "
                        f"calls; only load checkpoints written by balatro-train") from None
    except UserError as e:
        raise UserError(f"{key}={path}: {e}") from None
    try:  # albumentations.from_dict builds only the transforms of its own registry, by name
        preprocessing_of(state).pipeline()
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{key}={path}: refused, its preprocessing is not an albumentations pipeline "
                        f"({type(e).__name__}: {e}); only load checkpoints written by balatro-train") from None


# What a resume may change: how long and where the run goes on, and where its data lies now. Any other
# change would silently not apply (the optimizer's restored lr) or not fit what is restored (a new
# freeze, another scheduler): those start a new stage with init_from.
MAY_CHANGE_ON_RESUME = ("resume", "init_from", "publish_to", "trainer.epochs", "trainer.patience", "trainer.device",
                        "trainer.num_workers", "trainer.log_every_n_steps", "trainer.checkpoint_interval",
                        "trainer.compile", "dataset.labels_file", "dataset.augmented_labels_files", "dataset.root")
NOT_SET = "(not set)"


def first_difference(saved: dict, current: dict, ignore=MAY_CHANGE_ON_RESUME) -> tuple[str, object, object] | None:
    """The first dotted key whose value differs between two resolved run configs, with (saved, current)
    values; keys under `ignore` are skipped. None when they agree."""
    flat_saved, flat_current = flat(saved), flat(current)
    for key in [*flat_current, *(k for k in flat_saved if k not in flat_current)]:
        if any(key == skip or key.startswith(skip + ".") for skip in ignore):
            continue
        old, new = flat_saved.get(key, NOT_SET), flat_current.get(key, NOT_SET)
        if old != new:
            return key, old, new
    return None


def flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_compatible(checkpoint: dict, cfg, key: str) -> None:
    """A checkpoint whose weights start this run (resume, init_from) has its tasks and its model; one that
    is resumed also has the run's settings, apart from MAY_CHANGE_ON_RESUME."""
    fields = {task: t.field for task, t in cfg.tasks.items()}
    if checkpoint["fields"] != fields:
        raise UserError(f"{key}={getattr(cfg, key)}: the checkpoint was trained for tasks {checkpoint['fields']}, "
                        f"this run has {fields}; pick the same task=...")
    saved_heads, these_heads = head_configs(checkpoint["config"]), head_configs(OmegaConf.to_container(cfg, resolve=True))
    if saved_heads != these_heads:
        raise UserError(f"{key}={getattr(cfg, key)}: the checkpoint's task heads are {saved_heads}, this run asks for "
                        f"{these_heads}; pick the same tasks.<task>.head (and heads.* keys)")
    initial = ("pretrained", "weights")  # where the first weights came from: the checkpoint's replace them
    saved_model = {k: v for k, v in checkpoint["config"]["model"].items() if k not in initial}
    this_model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in initial}
    if saved_model != this_model:
        raise UserError(f"{key}={getattr(cfg, key)}: the checkpoint holds a {saved_model} model, this run asks "
                        f"for {this_model}; pick the same model=... (and model.* keys)")
    difference = key == "resume" and first_difference(checkpoint["config"], OmegaConf.to_container(cfg, resolve=True))
    if difference:
        name, old, new = difference
        # e.g. scheduler.epochs: ${trainer.epochs}, which a resume may change, but the restored scheduler would not
        given_as = flat(OmegaConf.to_container(cfg, resolve=False)).get(name)
        follows = f" (it follows {given_as})" if isinstance(given_as, str) and "${" in given_as else ""
        raise UserError(f"resume={cfg.resume}: {name} is {new} here but {old} in the run it resumes{follows}; a resume "
                        f"goes on with that run's settings (its optimizer and scheduler state too): drop the change, "
                        f"or start a new stage from its weights with init_from={cfg.resume}")


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
