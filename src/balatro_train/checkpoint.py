"""Checkpoints, owned here: what one holds (`Checkpoint`), how it is written (atomically, `Checkpoint.save`)
and read (`load_checkpoint`, only with `torch.load(weights_only=True)`), and the questions other modules
ask of it (the model it describes, its embedding-head tasks, whether it can resume, what was enrolled).
No other module reads the saved dict.

On disk a checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no pickled objects),
tagged with its `FORMAT`. Its saved config is data: the model, heads and metrics it describes are built
through balatro-train's own constructors, and a config naming anything else is refused on loading. So
loading a checkpoint never runs code from the file.

Two kinds share the format: a training checkpoint (`last.pt`, `epoch_NNN.pt`) also holds what a resume
needs (`TrainingState`: optimizer, scheduler, scaler, RNGs, the raw weights beside their average); a
model checkpoint (`best.pt`, what `publish_to` copies, an enrolled one) holds only what inference needs.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import pickle
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from balatro_train.atomic import save_bytes
from balatro_train.config import upgrade_saved_config
from balatro_train.embedding import CosineClassifier
from balatro_train.errors import UnknownCallable, UserError
from balatro_train.metrics import metric_class
from balatro_train.model import HEAD_CLASSES, build_model, head_configs, head_factories, model_options
from balatro_train.preprocessing import Preprocessing

# 2: the model normalises its uint8 input itself (model.ImageInput); format 1 models expected their
# validation pipeline to normalise, so they cannot be used the new way.
FORMAT = "balatro-train/2"
TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "rng", "training_weights", "averaged_steps")
log = logging.getLogger("balatro_train")


@dataclass
class Progress:
    """How far a run has come: what a resume restores besides the weights and the optimizer."""

    epoch: int = 0  # the last finished epoch
    best_val_loss: float = math.inf
    bad_epochs: int = 0  # epochs since the best one, for early stopping
    history: list[dict] = field(default_factory=list)  # metrics.jsonl's rows so far
    partial_epoch: dict | None = None  # an interrupted epoch: {"seen": images, "loss_sums": {task: [sum, count]}}

    def record(self, row: dict) -> bool:
        """Add a finished epoch; returns whether its combined validation loss is the best so far."""
        self.epoch = row["epoch"]
        self.history.append(row)
        improved = row["val_loss"] < self.best_val_loss
        if improved:
            self.best_val_loss, self.bad_epochs = row["val_loss"], 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def best_epoch(self) -> int | None:
        return min(self.history, key=lambda r: r["val_loss"])["epoch"] if self.history else None


@dataclass
class TrainingState:
    """What only a resume needs: the optimizer's, scheduler's and scaler's states, every RNG, and where the
    validated weights are an average (trainer.ema_decay), the weights being trained and the average's length."""

    optimizer: dict
    scheduler: dict
    scaler: dict
    rng: dict
    training_weights: dict | None = None
    averaged_steps: int = 0


@dataclass
class Checkpoint:
    """Everything a checkpoint holds. `weights` are the model's that were validated (the EMA where the run
    keeps one); `unknown_thresholds`, per embedding-head task, the max cosine below which an image is
    "unknown", calibrated on the validation images by the last validation of these weights. `training` is
    None in a model checkpoint; `enrolled` and `cards` say what `balatro_train.enroll` added."""

    config: dict  # the run's resolved config
    class_names: dict[str, list[str]]  # per task, in output order
    weights: dict[str, torch.Tensor]
    preprocessing: Preprocessing
    progress: Progress = field(default_factory=Progress)
    split: dict = field(default_factory=dict)
    pretrained_loaded: bool = False
    pretrained_source: str | None = None  # where the backbone's first weights came from (None: random init)
    unknown_thresholds: dict[str, float] = field(default_factory=dict)
    training: TrainingState | None = None
    enrolled: dict[str, dict[str, int]] = field(default_factory=dict)  # per task, images per enrolled card
    cards: dict[str, dict] = field(default_factory=dict)  # an enrolled card's field values (type, rarity)

    @classmethod
    def of_run(cls, cfg, progress: Progress, model, data, thresholds, optimizer, scheduler, scaler, averaged=None):
        """The run's training checkpoint: enough to resume it exactly, and to use its model (config, class
        names, task fields, preprocessing) without the run's config files."""
        training = TrainingState(
            optimizer.state_dict(),
            scheduler.state_dict(),
            scaler.state_dict(),
            rng_state(),
            model.state_dict() if averaged else None,
            int(averaged.n_averaged) if averaged else 0,
        )
        return cls(
            OmegaConf.to_container(cfg, resolve=True),
            dict(data.class_names),
            (averaged.module if averaged else model).state_dict(),
            data.preprocessing,
            dataclasses.replace(progress, history=list(progress.history)),
            data.split,
            model.pretrained_loaded,
            model.pretrained_source,
            dict(thresholds or {}),
            training,
        )

    def for_inference(self) -> Checkpoint:
        """The model checkpoint of these weights: what predict, evaluate, export and enrol need, without the
        optimizer state and the raw training weights (a default run's best.pt: a quarter of the size)."""
        return dataclasses.replace(self, training=None)

    # ---- the questions other modules ask -------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        return list(self.class_names)

    @property
    def fields(self) -> dict[str, str]:
        """Per task, the labels field it predicts."""
        return {task: self.config["tasks"][task]["field"] for task in self.class_names}

    @property
    def task_configs(self) -> dict[str, dict]:
        return {task: self.config["tasks"][task] for task in self.class_names}

    @property
    def model_config(self) -> dict:
        return self.config["model"]

    @property
    def backbone(self) -> str:
        return self.config["model"]["backbone"]

    @property
    def embedding_tasks(self) -> list[str]:
        """The tasks whose head holds class prototypes (a cosine head): those that say "unknown" and enrol cards."""
        heads = head_configs(self.config)
        return [task for task in self.class_names if HEAD_CLASSES.get(heads[task]["_target_"]) is CosineClassifier]

    @property
    def can_resume(self) -> bool:
        return self.training is not None and not self.enrolled

    def model(self, training_weights: bool = False) -> nn.Module:
        """The checkpoint's model, rebuilt from its own `model` config and heads, in eval mode: with the
        validated weights, or with `training_weights` those a resume goes on training."""
        weights = self.weights
        if training_weights and self.training is not None and self.training.training_weights is not None:
            weights = self.training.training_weights
        model = build_model(self.config["model"], self.class_names, weights, head_factories(self.config))
        model.pretrained_loaded, model.pretrained_source = self.pretrained_loaded, self.pretrained_source
        return model.eval()

    def prototypes(self, task: str) -> torch.Tensor:
        """An embedding head's class prototypes (its weight rows), in class order."""
        return self.weights[f"heads.{task}.weight"]

    def head_scale(self, task: str) -> float:
        """An embedding head's scale: its logits are scale x the cosine to each prototype."""
        return float(self.weights[f"heads.{task}.scale"])

    def with_enrolled(
        self, prototypes: dict[str, torch.Tensor], class_names: dict[str, list[str]], enrolled: dict, cards: dict
    ) -> Checkpoint:
        """A model checkpoint with these prototypes and class names for its embedding-head tasks. It no longer
        resumes its run: the optimizer's state and the training weights do not match its heads any more."""
        weights = {**self.weights, **{f"heads.{task}.weight": p for task, p in prototypes.items()}}
        return dataclasses.replace(
            self, weights=weights, class_names=class_names, enrolled=enrolled, cards=cards, training=None
        )

    def restore(self, optimizer, scheduler, scaler, averaged=None) -> Progress:
        """Put a resumed run's optimizer, scheduler, scaler, EMA and RNGs back as they were; returns its progress."""
        optimizer.load_state_dict(self.training.optimizer)
        scheduler.load_state_dict(self.training.scheduler)
        scaler.load_state_dict(self.training.scaler)
        if averaged is not None and self.training.training_weights is not None:
            averaged.module.load_state_dict(self.weights)
            averaged.n_averaged.fill_(self.training.averaged_steps)
        restore_rng_state(self.training.rng)
        return dataclasses.replace(self.progress, history=list(self.progress.history))

    # ---- the file ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The saved form: plain data and tensors only, as `torch.load(weights_only=True)` reads them."""
        training = dataclasses.asdict(self.training) if self.training else dict.fromkeys(TRAINING_KEYS)
        state = {
            "format": FORMAT,
            "epoch": self.progress.epoch,
            "partial_epoch": self.progress.partial_epoch,
            "best_val_loss": self.progress.best_val_loss,
            "bad_epochs": self.progress.bad_epochs,
            "history": self.progress.history,
            "model": self.weights,
            **training,
            "class_names": self.class_names,
            "fields": self.fields,
            "split": self.split,
            "pretrained_loaded": self.pretrained_loaded,
            "pretrained_source": self.pretrained_source,
            "config": self.config,
            "preprocessing": self.preprocessing.to_dict(),
            "unknown_thresholds": self.unknown_thresholds,
        }
        if self.enrolled:
            state.update(enrolled=self.enrolled, cards=self.cards)
        return state

    @classmethod
    def from_dict(cls, state: dict) -> Checkpoint:
        training = None
        if state.get("optimizer") is not None:
            training = TrainingState(**{key: state[key] for key in TRAINING_KEYS})
            training.averaged_steps = int(training.averaged_steps or 0)
        progress = Progress(
            state.get("epoch", 0),
            state.get("best_val_loss", math.inf),
            state.get("bad_epochs", 0),
            list(state.get("history") or []),
            state.get("partial_epoch"),
        )
        return cls(
            upgrade_saved_config(state["config"]),
            {task: list(names) for task, names in state["class_names"].items()},
            state["model"],
            Preprocessing.from_dict(state["preprocessing"]),
            progress,
            state.get("split") or {},
            bool(state.get("pretrained_loaded", False)),
            state.get("pretrained_source"),
            dict(state.get("unknown_thresholds") or {}),
            training,
            dict(state.get("enrolled") or {}),
            dict(state.get("cards") or {}),
        )

    def save(self, paths: list[Path]) -> None:
        save_checkpoint(self.to_dict(), paths)


def save_checkpoint(state: dict, paths: list[Path]) -> None:
    """Serialise once, then write each path atomically (temporary file beside it, fsync, rename),
    so that a kill at any moment leaves the previous file whole."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    for path in paths:
        save_bytes(buffer.getbuffer(), path)


def load_checkpoint(path: str | Path, key: str = "checkpoint", resuming: bool | None = None) -> Checkpoint:
    """Load a balatro-train checkpoint; `key` names the config key that pointed to it, for errors. One that is
    `resuming` (by default when `key` is resume) must hold its run's training state."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}={path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        pickled_global = re.search(r"GLOBAL ([\w.]+)", str(e))
        if pickled_global:  # a pickled Python object: loading it could run code, so it is never loaded
            raise UserError(
                f"{key}={path}: refused, the file holds a Python object ({pickled_global[1]}) "
                f"besides weights and plain data; only load checkpoints written by balatro-train"
            ) from None
        raise UserError(
            f"{key}={path}: damaged or not a checkpoint (it does not unpickle as one); "
            f"use another file, e.g. an epoch_NNN.pt beside it"
        ) from None
    except Exception as e:  # noqa: BLE001  (truncated zip, random bytes, text: torch raises many kinds)
        raise UserError(
            f"{key}={path}: damaged or not a checkpoint, truncated or corrupt ({type(e).__name__}); "
            f"use another file, e.g. an epoch_NNN.pt beside it"
        ) from None
    if isinstance(state, dict) and state.get("format") == "balatro-train/1":
        raise UserError(
            f"{key}={path}: written by an older balatro-train (format 1, whose models took images "
            f"normalised by the pipeline); retrain it with this version"
        )
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{key}={path}: not a balatro-train checkpoint (no '{FORMAT}' format tag)")
    check_builds_only_what_balatro_train_builds(state, path, key)
    checkpoint = Checkpoint.from_dict(state)
    if (key == "resume" if resuming is None else resuming) and not checkpoint.can_resume:
        raise UserError(cannot_resume(checkpoint, path))
    return checkpoint


def cannot_resume(checkpoint: Checkpoint, path: Path) -> str:
    if checkpoint.enrolled:
        return (
            f"resume={path}: cards were enrolled into this checkpoint (balatro_train.enroll), so it no "
            f"longer continues its run; start a new run from it with init_from={path}"
        )
    return (
        f"resume={path}: a model checkpoint (best.pt, or a published copy), which holds the model without its "
        f"run's optimizer state; resume from {path.with_name('last.pt')} or an epoch_NNN.pt beside it, or start "
        f"a new stage from it with init_from={path}"
    )


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
        raise UserError(
            f"{key}={path}: refused, its config names {e.target} ({e.key}), which balatro-train never "
            f"calls; only load checkpoints written by balatro-train"
        ) from None
    except UserError as e:
        raise UserError(f"{key}={path}: {e}") from None
    try:  # albumentations.from_dict builds only the transforms of its own registry, by name
        Preprocessing.from_dict(state["preprocessing"]).pipeline()
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"{key}={path}: refused, its preprocessing is not an albumentations pipeline "
            f"({type(e).__name__}: {e}); only load checkpoints written by balatro-train"
        ) from None


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
