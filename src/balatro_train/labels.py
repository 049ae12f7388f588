"""The annotation tool's files: labels.json and augmented.json read exactly as the tool writes them,
each image resolved on disk, and the checks that keep one image from silently replacing another."""

from __future__ import annotations

import codecs
import filecmp
import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from balatro_train.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    file: str  # the key in its labels file, unique within the dataset
    path: Path  # the image on disk
    meta: dict  # the labels entry: name, type, rarity, modifier, ...
    parent: str | None = None  # for an augmented image, the original's file name
    source: str = ""  # the labels file that lists it


def read_labels(labels_file: str | Path, root: str | Path, augmented: bool = False) -> list[Sample]:
    """Read a labels.json (or augmented.json) exactly as the annotation tool writes it."""
    labels_file = Path(labels_file)
    if not labels_file.is_file():
        raise UserError(
            f"{labels_file}: labels file not found; set dataset.labels_file "
            f"(or dataset.augmented_labels_files) to an existing file"
        )
    entries = parse_labels(labels_file)
    samples = []
    for file, meta in entries.items():
        if not isinstance(meta, dict):
            raise UserError(f"{labels_file}: entry {file!r} is not an object of labels")
        parent = meta.get("parent") if augmented else None
        if augmented and not parent:
            raise UserError(f"{labels_file}: augmented entry {file!r} has no 'parent'")
        samples.append(
            Sample(file, resolve_image_path(file, meta, labels_file, Path(root)), meta, parent, str(labels_file))
        )
    return samples


def parse_labels(labels_file: Path) -> dict:
    """The file's JSON object, refusing what json.loads would read without a word: text that is not
    UTF-8, and a key given twice (json keeps the last: one image's labels, or one of its values, would
    vanish)."""
    raw = labels_file.read_bytes()
    # Windows editors often save UTF-8 with a byte-order mark, which json.loads refuses: skip it.
    body = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + len(raw) - len(body)  # counted in the file, byte-order mark included
        raise UserError(
            f"{labels_file}: not UTF-8 text (byte {offset} is 0x{raw[offset]:02x}); save it as UTF-8"
        ) from None
    repeats = RepeatedKeys()
    try:
        entries = json.loads(text, object_pairs_hook=repeats.hook)
    except json.JSONDecodeError as e:
        raise UserError(f"{labels_file}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(entries, dict):
        raise UserError(
            f"{labels_file}: expected a JSON object mapping image file names to labels, "
            f"found a {type(entries).__name__}"
        )
    if repeats.of(entries):
        raise UserError(f"{labels_file}: {repeats.of(entries)[0]!r} is listed twice; keep one entry per image file")
    for file, meta in entries.items():
        repeated = repeats.first_inside(meta)
        if repeated is not None:
            raise UserError(f"{labels_file}: entry {file!r} gives {repeated!r} twice; keep one value per key")
    return entries


class RepeatedKeys:
    """Records the keys each JSON object gives more than once. json.loads calls `hook` bottom-up, an
    entry's own object before the file's, so only once the whole file is read can a repeat be placed:
    an image listed twice, or a key given twice inside one image's entry."""

    def __init__(self):
        # Each object with a repeat is held here, so that no other object can take its id while we look.
        self.found: dict[int, tuple[dict, list[str]]] = {}

    def hook(self, pairs: list[tuple[str, object]]) -> dict:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            self.found[id(obj)] = (obj, [key for key, n in Counter(key for key, _ in pairs).items() if n > 1])
        return obj

    def of(self, obj) -> list[str]:
        """The keys `obj` itself gives more than once."""
        held = self.found.get(id(obj))
        return held[1] if held is not None and held[0] is obj else []

    def first_inside(self, value) -> str | None:
        """A key given twice in `value` or in any object nested in it."""
        if isinstance(value, dict):
            if self.of(value):
                return self.of(value)[0]
            value = list(value.values())
        if isinstance(value, list):
            return next((key for item in value if (key := self.first_inside(item)) is not None), None)
        return None


def resolve_image_path(file: str, meta: dict, labels_file: Path, root: Path) -> Path:
    """`full_path` (absolute, or relative to `root`) where that file exists; failing that, the file
    beside the labels file (a set copied from another machine keeps its images beside its labels)."""
    full_path = meta.get("full_path")
    beside = labels_file.parent / file
    if full_path:
        candidate = Path(full_path) if Path(full_path).is_absolute() else root / full_path
        if candidate.is_file():
            refuse_a_different_image_beside(file, candidate, beside, labels_file)
            return candidate
    return beside if beside.is_file() or not full_path else candidate


def refuse_a_different_image_beside(file: str, full_path: Path, beside: Path, labels_file: Path) -> None:
    """Two capture sessions whose tool reused generic file names: full_path can point at the other
    session's image while this set's own lies beside its labels, and the run would silently train on
    the wrong picture. The same file, or a byte-identical copy, is no conflict."""
    if not beside.is_file() or os.path.samefile(full_path, beside):
        return
    if filecmp.cmp(full_path, beside, shallow=False):  # sizes first, bytes only when they agree
        return
    raise UserError(
        f"{labels_file}: entry {file!r}: full_path gives {full_path}, but {beside} beside the labels "
        f"file is a different image; set dataset.root so that full_path points at this set's images, "
        f"or remove the stale copy"
    )


def check_unique_files(samples: list[Sample]) -> None:
    """File names key the split and augmented parents, so one name may label one image only: an
    augmented copy named like an original would silently take its place."""
    where: dict[str, str] = {}
    for sample in samples:
        if sample.file in where:
            raise UserError(
                f"{sample.file!r} is listed in both {where[sample.file]} and {sample.source}; "
                f"file names must be unique across the labels files: rename one of the images"
            )
        where[sample.file] = sample.source


def check_fields(samples: list[Sample], tasks: dict, labels_files: list[str]) -> None:
    """Every entry gives each task's field a usable class name; names that differ only by case or
    spaces are logged, since each would train as a class of its own."""
    for sample in samples:
        where = f"entry {sample.file!r} (from {sample.source or ', '.join(labels_files)})"
        for task_name, task in tasks.items():
            if task.field not in sample.meta:
                raise UserError(f"{where} has no {task.field!r} field, needed by task {task_name!r}")
            problem = label_problem(sample.meta[task.field])
            if problem:
                raise UserError(
                    f"{where}: its {task.field!r} (task {task_name!r}) is {problem}; "
                    f"give it the class name of the image"
                )
    for task_name, task in tasks.items():
        warn_near_identical_names(task_name, task.field, class_names_of(samples, task.field))


def label_problem(value) -> str | None:
    """Why `value` cannot be a class name, or None. Numbers are fine (str()'d like any name); null
    would become the class "None", an empty name a class nobody meant."""
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return f"a {'list' if isinstance(value, list) else 'JSON object'}, not one class name"
    if not str(value).strip():
        return "empty"
    return None


def warn_near_identical_names(task_name: str, field: str, names: list[str]) -> None:
    """'Joker', 'Joker ' and 'joker' are three classes to the model: most likely one card typed thrice."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        groups[name.strip().casefold()].append(name)
    alike = [group for group in groups.values() if len(group) > 1]
    if alike:
        log.warning(
            "task %s: %s values that differ only by case or surrounding spaces train as separate "
            "classes: %s; relabel them alike if they are the same class",
            task_name,
            field,
            "; ".join(", ".join(repr(name) for name in group) for group in alike),
        )


def class_names_of(samples: list[Sample], field: str) -> list[str]:
    return sorted({str(sample.meta[field]) for sample in samples})
