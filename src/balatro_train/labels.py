"""The annotation tool's files: labels.json and augmented.json read exactly as the tool writes them,
each image resolved on disk, and the checks that keep one image from silently replacing another."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from balatro_train.errors import UserError


@dataclass(frozen=True)
class Sample:
    file: str                  # the key in its labels file, unique within the dataset
    path: Path                 # the image on disk
    meta: dict                 # the labels entry: name, type, rarity, modifier, ...
    parent: str | None = None  # for an augmented image, the original's file name
    source: str = ""           # the labels file that lists it


def read_labels(labels_file: str | Path, root: str | Path, augmented: bool = False) -> list[Sample]:
    """Read a labels.json (or augmented.json) exactly as the annotation tool writes it."""
    labels_file = Path(labels_file)
    if not labels_file.is_file():
        raise UserError(f"{labels_file}: labels file not found; set dataset.labels_file "
                        f"(or dataset.augmented_labels_files) to an existing file")
    try:
        entries = json.loads(labels_file.read_text(encoding="utf-8"), object_pairs_hook=refuse_duplicate_keys)
    except json.JSONDecodeError as e:
        raise UserError(f"{labels_file}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except DuplicateKey as e:
        raise UserError(f"{labels_file}: {e.args[0]!r} is listed twice; keep one entry per image file") from None
    if not isinstance(entries, dict):
        raise UserError(f"{labels_file}: expected a JSON object mapping image file names to labels, "
                        f"found a {type(entries).__name__}")
    samples = []
    for file, meta in entries.items():
        if not isinstance(meta, dict):
            raise UserError(f"{labels_file}: entry {file!r} is not an object of labels")
        parent = meta.get("parent") if augmented else None
        if augmented and not parent:
            raise UserError(f"{labels_file}: augmented entry {file!r} has no 'parent'")
        samples.append(Sample(file, resolve_image_path(file, meta, labels_file, Path(root)), meta, parent,
                              str(labels_file)))
    return samples


class DuplicateKey(ValueError):
    pass


def refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads keeps the last of two equal keys without a word: one image's labels would vanish."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen


def resolve_image_path(file: str, meta: dict, labels_file: Path, root: Path) -> Path:
    """`full_path` (absolute, or relative to `root`) where that file exists; failing that, the file
    beside the labels file (a set copied from another machine keeps its images beside its labels)."""
    full_path = meta.get("full_path")
    if full_path:
        candidate = Path(full_path) if Path(full_path).is_absolute() else root / full_path
        if candidate.is_file():
            return candidate
    beside = labels_file.parent / file
    return beside if beside.is_file() or not full_path else candidate


def check_unique_files(samples: list[Sample]) -> None:
    """File names key the split and augmented parents, so one name may label one image only: an
    augmented copy named like an original would silently take its place."""
    where: dict[str, str] = {}
    for sample in samples:
        if sample.file in where:
            raise UserError(f"{sample.file!r} is listed in both {where[sample.file]} and {sample.source}; "
                            f"file names must be unique across the labels files: rename one of the images")
        where[sample.file] = sample.source


def check_fields(samples: list[Sample], tasks: dict, labels_files: list[str]) -> None:
    for sample in samples:
        for task_name, task in tasks.items():
            if task.field not in sample.meta:
                raise UserError(f"entry {sample.file!r} (from {', '.join(labels_files)}) has no "
                                f"{task.field!r} field, needed by task {task_name!r}")


def class_names_of(samples: list[Sample], field: str) -> list[str]:
    return sorted({str(sample.meta[field]) for sample in samples})
