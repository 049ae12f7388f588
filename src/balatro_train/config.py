"""Structured configs: the types and keys of `conf/train.yaml`, checked by Hydra before any work.

A wrong type (`trainer.epochs=abc`) or an unknown key (`trainer.epoch=3`) fails at composition
with a message naming the key. Groups whose options are `_target_` nodes (model, freeze,
optimizer, scheduler, transforms, metrics) stay open dictionaries: `instantiate` checks them.
Value ranges are checked in `check_config`, so that every mistake is reported the same way.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, ValidationError

from balatro_train.errors import UserError


@dataclass
class DatasetConfig:
    labels_file: str = "data/dataset_default/labels.json"
    augmented_labels_files: list[str] = field(default_factory=list)
    root: str = "."
    # A `_target_` node called before reading the files (the demo renders its set there).
    render: Any | None = None


@dataclass
class DataConfig:
    image_size: int = 64
    val_split: float = 0.2
    weighted_sampler: bool = False
    background: list[int] = field(default_factory=lambda: [0, 0, 0])
    on_bad_image: str = "error"
    held_out_cards: int = 0
    recolour: float = 0.3
    recolour_transforms: str = "recolour"
    # Names in `transforms`: one pipeline of each for every task, since one image feeds every head.
    train_transforms: str = "train"
    val_transforms: str = "val"


@dataclass
class TrainerConfig:
    epochs: int = 30
    batch_size: int = 32
    patience: int = 5
    checkpoint_interval: int = 5
    log_every_n_steps: int = 20
    device: str = "auto"
    precision: str = "auto"
    num_workers: str = "auto"
    combine_losses: str = "max"
    channels_last: bool = True
    compile: bool = False
    ema_decay: float = 0.99


@dataclass
class TaskConfig:
    field: str = "name"
    class_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    label_smoothing: float = 0.1
    head: str = "linear"  # a name in `heads` (conf/heads/standard.yaml)
    accept_known: float = 0.95  # embedding heads: share of known validation images "unknown" must accept
    colour_invariant: bool = False  # the label survives a hue rotation or an inversion (data.recolour)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # `field` is taken above


@dataclass
class TrainConfig:
    seed: int = 0
    resume: str | None = None
    init_from: str | None = None
    publish_to: str | None = "data/models/best_model.pt"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    model: Any = None
    freeze: Any = None
    optimizer: Any = None
    scheduler: Any = None
    transforms: dict[str, Any] = field(default_factory=dict)
    heads: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(name="train_schema", node=TrainConfig)

# conf/ sits at the top of the checkout, beside src/ (the project is installed editable).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")

PRECISIONS = ("auto", "32", "bf16", "16")
COMBINE_RULES = ("max", "mean", "sum")


# Where the pipelines were chosen before they moved to data.*: per task, the first task deciding.
PER_TASK_PIPELINE_KEYS = ("train_transforms", "val_transforms")


def upgrade_saved_config(config: dict) -> dict:
    """A copy of a saved config (plain containers, as `OmegaConf.to_container` gives them) in today's keys.

    Checkpoints and run folders (.hydra/config.yaml) written before the pipelines moved to the data config
    hold tasks.<task>.train_transforms / val_transforms and no data.train_transforms / val_transforms:
    the copy drops the per-task keys and, where data.* lacks them, takes the first task's values (the ones
    those runs used). A config in today's keys comes back equal to `config`; `config` is never changed."""
    upgraded = copy.deepcopy(config)
    tasks = upgraded.get("tasks") or {}
    old_keys = [
        {key: task.pop(key) for key in PER_TASK_PIPELINE_KEYS if key in task}
        for task in tasks.values()
        if isinstance(task, dict)
    ]
    if old_keys:
        data = upgraded.setdefault("data", {})
        for key, value in old_keys[0].items():
            data.setdefault(key, value)
    return upgraded


def typed_config(cfg: DictConfig) -> DictConfig:
    """`cfg` checked against the structured config. Hydra applies the schema when it composes
    conf/train.yaml, but not when a run is re-run from its saved .hydra/config.yaml, which has no
    defaults list: the same wrong type must be refused the same way there, and a run saved in older
    keys is read in today's (upgrade_saved_config)."""
    cfg = upgrade_saved_run_config(cfg)
    try:
        typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    except ValidationError as e:
        raise UserError(f"{e.full_key}: {str(e).splitlines()[0]}") from None
    OmegaConf.set_struct(typed, OmegaConf.is_struct(cfg))
    return typed


def upgrade_saved_run_config(cfg: DictConfig) -> DictConfig:
    """upgrade_saved_config on a DictConfig, interpolations left unresolved (they resolve after the merge
    with the schema, as in any run); `cfg` itself when it needs no upgrade, so its flags stay as they are."""
    container = OmegaConf.to_container(cfg, resolve=False)
    upgraded = upgrade_saved_config(container)
    if upgraded == container:
        return cfg
    fresh = OmegaConf.create(upgraded)
    OmegaConf.set_struct(fresh, OmegaConf.is_struct(cfg))
    return fresh


def check_config(cfg) -> None:
    """Reject impossible values before any data is read, naming the key and the fix."""
    t, d = cfg.trainer, cfg.data
    if not cfg.tasks:
        raise UserError("no task selected: choose one with task=identification|modifier|multi")
    for key, value in (
        ("trainer.epochs", t.epochs),
        ("trainer.batch_size", t.batch_size),
        ("trainer.checkpoint_interval", t.checkpoint_interval),
        ("trainer.log_every_n_steps", t.log_every_n_steps),
    ):
        if value < 1:
            raise UserError(f"{key}={value} must be at least 1")
    if t.patience < 0:
        raise UserError(f"trainer.patience={t.patience} must be 0 (never stop early) or more")
    if not 0.0 < d.val_split < 1.0:
        raise UserError(f"data.val_split={d.val_split} must lie strictly between 0 and 1")
    if d.image_size < 32:
        raise UserError(f"data.image_size={d.image_size} is too small for the backbone: use 32 or more")
    if len(d.background) != 3 or not all(0 <= c <= 255 for c in d.background):
        raise UserError(f"data.background={list(d.background)} must be three values from 0 to 255")
    if d.held_out_cards < 0:
        raise UserError(f"data.held_out_cards={d.held_out_cards} must be 0 (train on every card) or more")
    if not 0.0 <= d.recolour <= 1.0:
        raise UserError(f"data.recolour={d.recolour} must lie between 0 (off) and 1")
    reads_colour = [name for name, task in cfg.tasks.items() if not task.colour_invariant]
    if d.recolour == 1.0 and 0 < len(reads_colour) < len(cfg.tasks):  # every image recoloured, so skipped by these
        raise UserError(
            f"data.recolour=1.0 leaves task {reads_colour[0]} (not colour-invariant) no image to "
            "learn from: use a share below 1"
        )
    if d.recolour and d.recolour_transforms not in cfg.transforms:
        raise UserError(
            f"data.recolour_transforms={d.recolour_transforms} is not a pipeline of transforms "
            f"(available: {', '.join(cfg.transforms)})"
        )
    if d.on_bad_image not in ("error", "skip"):
        raise UserError(f"data.on_bad_image={d.on_bad_image} must be error or skip")
    if t.batch_size < 2:
        raise UserError(
            f"trainer.batch_size={t.batch_size}: BatchNorm needs at least 2 images per batch; use 2 or more"
        )
    if t.precision not in PRECISIONS:
        raise UserError(f"trainer.precision={t.precision} is not one of {', '.join(PRECISIONS)}")
    if t.combine_losses not in COMBINE_RULES:
        raise UserError(f"trainer.combine_losses={t.combine_losses} is not one of {', '.join(COMBINE_RULES)}")
    if t.num_workers != "auto" and not (t.num_workers.isdigit()):
        raise UserError(f"trainer.num_workers={t.num_workers} must be auto or a whole number")
    for key in ("lr", "lr_backbone", "lr_heads"):
        lr = cfg.optimizer.get(key)
        if lr is not None and lr <= 0:
            raise UserError(f"optimizer.{key}={lr} must be greater than 0")
    for key in ("train_transforms", "val_transforms"):
        pipeline = d[key]
        if pipeline not in cfg.transforms:
            raise UserError(
                f"data.{key}={pipeline} is not a pipeline of transforms (available: {', '.join(cfg.transforms)})"
            )
    for name, task in cfg.tasks.items():
        if task.head not in cfg.heads and task.head != "linear":
            raise UserError(f"tasks.{name}.head={task.head} is not one of the heads ({', '.join(cfg.heads)})")
        if not 0.0 < task.accept_known < 1.0:
            raise UserError(
                f"tasks.{name}.accept_known={task.accept_known} must lie strictly between 0 and 1, e.g. 0.95"
            )
