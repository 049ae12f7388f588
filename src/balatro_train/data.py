"""The run's data from the annotation tool's files (balatro_train/labels.py): the images decoded once, the
stratified split and the datasets (their loaders: balatro_train/loaders.py).

Images are decoded, composited on the background colour and resized to `data.image_size`
once, up front (balatro_train/preprocessing.py); epochs then only augment small uint8 arrays,
and batches stay uint8 (N, H, W, 3) all the way to the device.

`build_data` runs five stages in turn: read_samples (the labels files and their checks),
decode_samples (every image once, data.on_bad_image), choose_split (held-out cards, then the
stratified split or the saved one), index_classes (class names and targets per task, checked) and
build_datasets (the training and validation CardDatasets and the run's Preprocessing).
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from balatro_train.embedding import IGNORE
from balatro_train.errors import UserError
from balatro_train.labels import Sample, check_fields, check_unique_files, class_names_of, read_labels
from balatro_train.preprocessing import Preprocessing, load_image

log = logging.getLogger(__name__)


def load_images(samples: list[Sample], size: int, background) -> tuple[np.ndarray, dict[str, str]]:
    """Decode every sample once into one (N, size, size, 3) uint8 array (PIL releases the GIL).

    Returns the array and {file: problem} for images that are missing or unreadable
    (zero bytes, truncated, not an image); their rows stay black.
    """
    from tqdm import tqdm

    def load(sample: Sample) -> np.ndarray | str:
        try:
            return load_image(sample.path, size, tuple(background))
        except FileNotFoundError:
            return "not found"
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files
            return f"not a readable image ({type(e).__name__}: {e})"

    images = np.zeros((len(samples), size, size, 3), dtype=np.uint8)
    bad = {}
    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL releases the GIL while decoding
        results = tqdm(pool.map(load, samples), total=len(samples), desc="decoding images", leave=False, disable=None)
        for i, (sample, result) in enumerate(zip(samples, results, strict=True)):
            if isinstance(result, str):
                bad[sample.file] = f"{sample.path}: {result}"
            else:
                images[i] = result
    return images, bad


def split_samples(
    originals: list[Sample], augmented: list[Sample], field: str, val_split: float, seed: int
) -> tuple[list[str], list[str]]:
    """Stratified split by `field`; returns (train files, validation files).

    Each class sends round(val_split * n) of its originals to validation, at least one when
    it has two or more. Augmented images never validate, and an augmented copy of a
    validation image never trains: that would measure memorisation, not recognition.
    """
    by_class: dict[str, list[str]] = defaultdict(list)
    for sample in originals:
        by_class[str(sample.meta[field])].append(sample.file)  # as class names are made: a number is a name
    rng = np.random.default_rng(seed)
    val: set[str] = set()
    for label in sorted(by_class):
        files = sorted(by_class[label])
        if len(files) < 2:
            continue
        n_val = min(len(files) - 1, max(1, math.floor(val_split * len(files) + 0.5)))
        val.update(files[i] for i in rng.permutation(len(files))[:n_val])
    train = [s.file for s in originals if s.file not in val]
    train += [s.file for s in augmented if s.parent not in val]
    return train, [s.file for s in originals if s.file in val]


def hold_out_cards(originals: list[Sample], field: str, cards: int, seed: int) -> list[str]:
    """The files of `cards` classes of `field` drawn by `seed` among those with 4 or more originals
    (data.held_out_cards): left out of training and validation entirely, they are the cards a
    model has never seen, for the open-set benchmark (balatro_train/openset.py)."""
    if not cards:
        return []
    by_class: dict[str, list[str]] = defaultdict(list)
    for sample in originals:
        by_class[str(sample.meta[field])].append(sample.file)
    eligible = sorted(label for label, files in by_class.items() if len(files) >= 4)
    if len(eligible) < cards:
        raise UserError(
            f"data.held_out_cards={cards}: only {len(eligible)} cards have the 4 or more screenshots "
            f"a held-out card needs; hold out fewer"
        )
    chosen = np.random.default_rng([seed, 7]).choice(len(eligible), cards, replace=False)
    return sorted(file for i in chosen for file in by_class[eligible[i]])


@dataclass
class Recolouring:
    """An augmentation for the tasks that colour does not decide: with probability `p` a training
    image is also passed through `pipeline` (a hue rotation or a colour inversion, which would turn one
    edition into another), and the tasks in `ignored_by` (the modifier) skip that image (target IGNORE)
    while the others (the card's identity) learn that a Polychrome or Negative card is still that card."""

    pipeline: object
    p: float
    ignored_by: tuple[str, ...]


class CardDataset(Dataset):
    """Pre-decoded uint8 images plus one integer target per task.

    Items are requested as (index, seed): the seed re-seeds the albumentations pipeline (and decides
    the recolouring), so an image's augmentation depends only on the sampler's draw, not on worker
    processes, and an interrupted run resumes with exactly the same augmentations.
    """

    def __init__(
        self, images: np.ndarray, targets: dict[str, torch.Tensor], pipeline, recolouring: Recolouring | None = None
    ):
        self.images, self.targets, self.pipeline, self.recolouring = images, targets, pipeline, recolouring

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, 0)
        # One pair of generators per image, drawn from in turn by every transform. (Compose's own
        # set_random_seed seeds each transform alike, so their draws would repeat one another: every
        # image whose brightness changes would also be moved, and by a correlated amount.)
        numpy_random, python_random = np.random.default_rng(seed), random.Random(seed)
        self.pipeline.set_random_state(numpy_random, python_random)
        image = self.pipeline(image=self.images[index])["image"]
        targets = {task: targets[index] for task, targets in self.targets.items()}
        recolour = self.recolouring
        if recolour is not None and python_random.random() < recolour.p:
            recolour.pipeline.set_random_state(numpy_random, python_random)
            image = recolour.pipeline(image=image)["image"]
            targets.update({task: torch.tensor(IGNORE) for task in recolour.ignored_by})
        return torch.from_numpy(np.ascontiguousarray(image)), targets  # uint8 (H, W, 3)


@dataclass
class Data:
    train: CardDataset
    val: CardDataset
    class_names: dict[str, list[str]]  # per task, in label-index order
    split: dict[str, list[str]]  # {"train": [...], "val": [...]} file names
    train_labels: list[str]  # the stratifying task's label of each training sample
    skipped: dict[str, str]  # unreadable images left out (data.on_bad_image=skip)
    preprocessing: Preprocessing  # how validation prepared its images: what inference must do


def build_data(cfg, class_names: dict[str, list[str]] | None = None, split: dict[str, list[str]] | None = None) -> Data:
    """Read the labels, decode every image once, split (or reuse a saved split), index the classes.

    `class_names` and `split` are a checkpoint's (init_from, resume): the classes its heads know and
    the split its run trained on."""
    labelled = read_samples(cfg.dataset, cfg.tasks, check_classes=class_names is None)
    decoded = decode_samples(labelled, cfg.data, cfg.dataset.labels_file)
    chosen = choose_split(decoded.usable, cfg, split)
    class_names, targets = index_classes(cfg.tasks, chosen, class_names, cfg.dataset.labels_file)
    train, val, preprocessing = build_datasets(cfg, decoded, chosen, targets)
    field = stratifying_field(cfg.tasks)
    return Data(
        train,
        val,
        class_names,
        chosen.split,
        [str(s.meta[field]) for s in chosen.train],
        skipped=decoded.bad,
        preprocessing=preprocessing,
    )


@dataclass
class Labelled:
    """The labels files' samples: the originals, and augmented copies of some of them."""

    originals: list[Sample]
    augmented: list[Sample]

    @property
    def samples(self) -> list[Sample]:
        return self.originals + self.augmented


@dataclass
class Decoded:
    """Every labelled image decoded once (`images`, a sample's row in `row[file]`), and the samples whose
    image could be read (`usable`); `bad`: {file: problem} for the others, left out (data.on_bad_image)."""

    images: np.ndarray
    row: dict[str, int]
    bad: dict[str, str]
    usable: Labelled


@dataclass
class ChosenSplit:
    """The run's split ({"train", "val", "held_out"} file names) and its samples; `labelled`: the usable
    samples less the held-out cards, whose classes every task must know and train on."""

    split: dict[str, list[str]]
    train: list[Sample]
    val: list[Sample]
    labelled: Labelled


def stratifying_field(tasks) -> str:
    """The first task's field: it stratifies the split, holds cards out and balances the sampler."""
    return next(iter(tasks.values())).field


def read_samples(ds, tasks, check_classes: bool) -> Labelled:
    """Stage 1, reading: dataset.labels_file and dataset.augmented_labels_files, checked before any image
    is decoded (fields, unique file names, parents, and with `check_classes` tasks with a single class)."""
    originals = read_labels(ds.labels_file, ds.root)
    if not originals:
        raise UserError(f"{ds.labels_file}: the dataset is empty; label some images first")
    augmented = [s for f in ds.augmented_labels_files for s in read_labels(f, ds.root, augmented=True)]
    check_fields(originals + augmented, tasks, [ds.labels_file, *ds.augmented_labels_files])
    if check_classes:  # before decoding every image: the labels alone decide it (a checkpoint's classes: later)
        refuse_single_class_tasks(
            {task: class_names_of(originals + augmented, t.field) for task, t in tasks.items()}, tasks, ds.labels_file
        )
    check_unique_files(originals + augmented)
    known = {sample.file for sample in originals}
    for sample in augmented:
        if sample.parent not in known:
            raise UserError(
                f"augmented image {sample.file!r} names parent {sample.parent!r}, which "
                f"{ds.labels_file} does not list; fix its 'parent' or add the original"
            )
    return Labelled(originals, augmented)


def decode_samples(labelled: Labelled, data_cfg, labels_file: str) -> Decoded:
    """Stage 2, decoding: every image once, at data.image_size on data.background. An unreadable image
    stops the run, or with data.on_bad_image=skip is logged and left out."""
    everything = labelled.samples
    images, bad = load_images(everything, data_cfg.image_size, data_cfg.background)
    if bad and data_cfg.on_bad_image == "error":
        first = next(iter(bad.values()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"{first}{more}; fix or remove it, or set data.on_bad_image=skip to train without it")
    for problem in bad.values():
        log.warning("skipping %s", problem)
    usable = Labelled(
        [s for s in labelled.originals if s.file not in bad], [s for s in labelled.augmented if s.file not in bad]
    )
    if not usable.originals:
        raise UserError(f"{labels_file}: no usable original image is left; label some images first")
    # Rows index the array of every labelled image, the bad ones' black rows included.
    return Decoded(images, {s.file: i for i, s in enumerate(everything)}, bad, usable)


def choose_split(usable: Labelled, cfg, saved: dict[str, list[str]] | None) -> ChosenSplit:
    """Stage 3, splitting: the held-out cards (data.held_out_cards) leave, then the rest is split by the
    stratifying task's classes (data.val_split, seed), or as the `saved` split (a resume) says."""
    field = stratifying_field(cfg.tasks)
    held_out = set(
        saved.get("held_out", [])
        if saved
        else hold_out_cards(usable.originals, field, cfg.data.held_out_cards, cfg.seed)
    )
    labelled = Labelled(
        [s for s in usable.originals if s.file not in held_out],
        [s for s in usable.augmented if s.parent not in held_out],
    )
    if saved is None:
        train_files, val_files = split_samples(
            labelled.originals, labelled.augmented, field, cfg.data.val_split, cfg.seed
        )
        split = {"train": train_files, "val": val_files, "held_out": sorted(held_out)}
    else:
        split = saved
        warn_unsplit(labelled.samples, split)
    by_file = {s.file: s for s in labelled.samples}
    missing = [f for f in split["train"] + split["val"] if f not in by_file]
    if missing:
        raise UserError(
            f"the saved split lists {len(missing)} images that are missing or unreadable now "
            f"(e.g. {missing[0]!r}); resume with the same dataset"
        )
    if not split["val"]:
        raise UserError(
            "no class has two or more original images, so nothing is left to validate on; label more images per card"
        )
    return ChosenSplit(split, [by_file[f] for f in split["train"]], [by_file[f] for f in split["val"]], labelled)


def index_classes(
    tasks, chosen: ChosenSplit, class_names: dict[str, list[str]] | None, labels_file: str
) -> tuple[dict[str, list[str]], dict[str, dict[str, torch.Tensor]]]:
    """Stage 4, class indexing: each task's class names (the labels', or a checkpoint's `class_names`) and
    its targets, {task: {"train": tensor, "val": tensor}} of class indices, once every class checks out."""
    if class_names is None:
        class_names = {task: class_names_of(chosen.labelled.samples, t.field) for task, t in tasks.items()}
    refuse_single_class_tasks(class_names, tasks, labels_file)  # again: skipped images may have left one
    targets = {}
    for task, t in tasks.items():
        index = {name: i for i, name in enumerate(class_names[task])}
        check_task_classes(task, t.field, index, chosen)
        targets[task] = {
            part: torch.tensor([index[str(s.meta[t.field])] for s in samples])
            for part, samples in (("train", chosen.train), ("val", chosen.val))
        }
    return dict(class_names), targets


def check_task_classes(task: str, field: str, index: dict[str, int], chosen: ChosenSplit) -> None:
    """Refuses classes the heads do not know (`index`, a checkpoint's) and classes with no training sample;
    logs those with no validation image."""
    unknown = sorted({str(s.meta[field]) for s in chosen.train + chosen.val} - index.keys())
    if unknown:
        raise UserError(
            f"task {task}: the data has classes the checkpoint does not know: "
            f"{', '.join(unknown[:10])}; train without init_from/resume or fix the labels"
        )
    # Every class the labels hold must train, including one seen only on an augmented copy of
    # a validation image (such copies never train): the head could never learn it.
    labelled = {str(s.meta[field]) for s in chosen.labelled.samples}
    untrained = sorted(labelled - {str(s.meta[field]) for s in chosen.train})
    if untrained:
        raise UserError(
            f"task {task}: classes with no training sample after the split: "
            f"{', '.join(untrained[:10])}; label more images of them or lower data.val_split"
        )
    unvalidated = sorted(labelled - {str(s.meta[field]) for s in chosen.val})
    if unvalidated:
        log.info(
            "task %s: %d of %d classes have no validation image (too few originals): %s%s",
            task,
            len(unvalidated),
            len(labelled),
            ", ".join(unvalidated[:5]),
            ", ..." if len(unvalidated) > 5 else "",
        )


def build_datasets(
    cfg, decoded: Decoded, chosen: ChosenSplit, targets: dict[str, dict[str, torch.Tensor]]
) -> tuple[CardDataset, CardDataset, Preprocessing]:
    """Stage 5, dataset building: training images through transforms.<data.train_transforms> (and
    data.recolour), validation images through transforms.<data.val_transforms>, which the Preprocessing
    records for inference. One pipeline of each for every task: one image feeds every head."""
    from hydra.utils import instantiate

    preprocessing = Preprocessing.of_run(
        cfg.data.image_size, cfg.data.background, instantiate(cfg.transforms[cfg.data.val_transforms])
    )
    train = CardDataset(
        decoded.images[[decoded.row[s.file] for s in chosen.train]],
        {task: t["train"] for task, t in targets.items()},
        instantiate(cfg.transforms[cfg.data.train_transforms]),
        recolouring(cfg),
    )
    val = CardDataset(
        decoded.images[[decoded.row[s.file] for s in chosen.val]],
        {task: t["val"] for task, t in targets.items()},
        preprocessing.pipeline(),
    )
    return train, val, preprocessing


def refuse_single_class_tasks(class_names: dict[str, list[str]], tasks, labels_file) -> None:
    """A head with one class has nothing to tell apart (its metrics refuse num_classes=1)."""
    for task, names in class_names.items():
        if len(names) == 1:
            others = [other for other in tasks if other != task]
            instead = f"task={others[0]}" if others else "another task=..."
            raise UserError(
                f"task {task}: every image in {labels_file} has {tasks[task].field}={names[0]!r}, and a "
                f"task needs two classes or more; label other {tasks[task].field} values, or train "
                f"without it ({instead})"
            )


def warn_unsplit(samples: list[Sample], split: dict[str, list[str]]) -> None:
    """A saved split (a resume) keeps the run's images; say how many labelled since it are left out."""
    listed = {*split["train"], *split["val"]}
    new = [s.file for s in samples if s.file not in listed]
    if new:
        log.warning(
            "%d images labelled since this run's split (e.g. %r) are left out: a resume trains on the "
            "images it started with; to train on them too, start a new stage from the checkpoint with "
            "init_from= instead of resume=",
            len(new),
            new[0],
        )


def recolouring(cfg) -> Recolouring | None:
    """data.recolour for the run's tasks: None when it is 0 or when every task reads colour."""
    from hydra.utils import instantiate

    invariant = [task for task, t in cfg.tasks.items() if t.colour_invariant]
    if not cfg.data.recolour or not invariant:
        return None
    return Recolouring(
        instantiate(cfg.transforms[cfg.data.recolour_transforms]),
        cfg.data.recolour,
        tuple(task for task in cfg.tasks if task not in invariant),
    )
