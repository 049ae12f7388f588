"""`python -m balatro_train.enroll checkpoint=<file or run folder> images=<files, folder or glob> name=<card name>
[type=... rarity=...] [out=...] [overwrite=true]`, or for a batch of new cards
`python -m balatro_train.enroll checkpoint=... labels=<labels.json of their screenshots> [out=...] [overwrite=true]`

Adds cards to a checkpoint without training: every task with an embedding head
(tasks.<task>.head=cosine) gets, for each new value of its field (a new card's name), a class whose
prototype is the normalised mean embedding of its screenshots (weight imprinting). A value the task
already knows has its prototype updated instead: an enrolled card's is the mean over all its
screenshots so far; a trained card's prototype weighs as much as the new screenshots together.

The screenshots are prepared exactly as validation prepared the checkpoint's images, and each is
also enrolled colour-inverted (`negative_view`, on by default): the Negative edition inverts a card's
colours, so a card enrolled from a Base screenshot is then recognised in Negative too, and the
reverse (on the demo's open-set benchmark this view raised top-1 on enrolled cards by several
points). Writes a new checkpoint (default: `<stem>_enrolled.pt` beside the input) that predict,
evaluate, export, the `Recognizer` and `init_from` take like any other. It records what was
enrolled (`enrolled`: per task, how many images each card's prototype averages, two per screenshot
with the inverted view; `cards`: the field values given, e.g. type and rarity); it no longer
resumes its training run.

`out` is never an input, the input checkpoint, a screenshot or the labels file, not even with
overwrite=true (give another out=); it replaces another existing file, an earlier enrolment at the
default `out` included, only with overwrite=true (balatro_train/outputs.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from balatro_train.checkpoint import load_checkpoint, save_checkpoint
from balatro_train.config import CONFIG_DIR
from balatro_train.embedding import imprint
from balatro_train.errors import UserError, exit_on_user_error
from balatro_train.inference import Recognizer, log_to_stderr, resolve_checkpoint
from balatro_train.labels import read_labels
from balatro_train.outputs import check_outputs
from balatro_train.predict import find_images

log = logging.getLogger("balatro_train.enroll")
CLI_KEYS = ("checkpoint", "images", "labels", "root", "out", "overwrite", "negative_view", "device", "batch_size")
PER_SCREENSHOT = {"full_path", "parent", "augmentation", "modifier"}  # labels keys that describe a screenshot, not the card


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="enroll")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    log_to_stderr()
    enroll_checkpoint(cfg)


def enroll_checkpoint(cfg: DictConfig) -> Path:
    """The command: the screenshots of `cfg` enrolled into its checkpoint, written to `out`; returns that path."""
    started = time.perf_counter()
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    state = load_checkpoint(checkpoint, "checkpoint")
    embedding_tasks(state, f"checkpoint={checkpoint}")  # before reading any screenshot
    paths, values = screenshots(cfg)
    out = Path(cfg.out) if cfg.out else checkpoint.with_name(f"{checkpoint.stem}_enrolled.pt")
    value = str(cfg.out) if cfg.out else f"{out} (the default, beside the checkpoint)"
    check_outputs("out", value, [(out, "")], inputs(checkpoint, paths, cfg), cfg.overwrite)  # before any embedding
    recognizer = Recognizer(state, cfg.device, cfg.batch_size)
    images, values = enrolment_views([load(recognizer, path) for path in paths], values, cfg.negative_view)
    enrolled, added = enroll(state, recognizer.embeddings(images), values)
    save_checkpoint(enrolled, [out])
    log.info("%d screenshots%s: %s in %.1f s; wrote %s", len(paths), " and their inverted views" if cfg.negative_view
             else "", "; ".join(added), time.perf_counter() - started, out)
    return out


def inputs(checkpoint: Path, paths: list[Path], cfg: DictConfig) -> list[tuple[Path, str]]:
    """What enroll reads, as outputs.check_outputs names them: the checkpoint, the labels file, the screenshots."""
    read = [(checkpoint, f"the checkpoint it reads (checkpoint={checkpoint})")]
    if cfg.labels is not None:
        read.append((Path(cfg.labels), f"the labels file it reads (labels={cfg.labels})"))
    given = f"labels={cfg.labels}" if cfg.labels is not None else f"images={cfg.images}"
    return [*read, *((path, f"the screenshot {path} it reads ({given})") for path in paths)]


def screenshots(cfg: DictConfig) -> tuple[list[Path], list[dict]]:
    """The images to enrol and each one's field values: from `labels` (the annotation tool's file), or
    from `images` with the values given on the command line (name=..., type=..., ...)."""
    if (cfg.labels is None) == (cfg.images is None):
        raise UserError("give images=<files, folder or glob> with name=<card name>, or labels=<labels.json> "
                        "of the new cards' screenshots (one of the two)")
    if cfg.labels is not None:
        samples = read_labels(cfg.labels, cfg.root)
        if not samples:
            raise UserError(f"labels={cfg.labels}: the file lists no screenshot")
        for sample in samples:
            if not sample.path.is_file():
                raise UserError(f"labels={cfg.labels}: {sample.path} (entry {sample.file!r}) does not exist; fix its "
                                f"full_path or set root=")
        return [s.path for s in samples], [dict(s.meta) for s in samples]
    fields = {key: str(value) for key, value in OmegaConf.to_container(cfg).items()
              if key not in CLI_KEYS and value is not None}
    paths = find_images(cfg.images)
    return paths, [fields] * len(paths)


def load(recognizer: Recognizer, path: Path) -> np.ndarray:
    """A screenshot prepared as validation prepared the checkpoint's images; a broken file stops the enrolment."""
    try:
        return recognizer.preprocessing.load(path)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files
        raise UserError(f"{path}: not a readable image ({type(e).__name__}); fix it or leave it out") from None


def enrolment_views(images: list[np.ndarray], values: list[dict], negative_view: bool = True
                    ) -> tuple[list[np.ndarray], list[dict]]:
    """The images to embed for enrolment, with their field values: each screenshot, and with
    `negative_view` also its colour inversion (what the card looks like in, or out of, the Negative
    edition). Hue-shifted views, tried for Polychrome, lowered top-1: they are not added."""
    if not negative_view:
        return list(images), list(values)
    return ([view for image in images for view in (image, 255 - image)],
            [value for value in values for _ in range(2)])


def embedding_tasks(state: dict, source: str = "checkpoint") -> list[str]:
    """The checkpoint's tasks whose head holds prototypes (a cosine head): those that can enrol cards."""
    tasks = [task for task in state["class_names"] if f"heads.{task}.scale" in state["model"]]
    if not tasks:
        raise UserError(f"{source}: none of its tasks has an embedding head, so cards cannot be enrolled "
                        f"without training; train with tasks.identification.head=cosine")
    return tasks


def enroll(state: dict, embeddings: dict[str, torch.Tensor], values: list[dict]) -> tuple[dict, list[str]]:
    """A copy of checkpoint `state` with the screenshots' cards enrolled into every embedding-head task;
    `embeddings` are theirs per task (`Recognizer.embeddings`), `values` their field values (the
    labels entries). Returns it and a line per card and task saying what was done."""
    tasks = embedding_tasks(state)
    weights, class_names = dict(state["model"]), {task: list(names) for task, names in state["class_names"].items()}
    enrolled = {task: dict(counts) for task, counts in (state.get("enrolled") or {}).items()}
    cards, done = dict(state.get("cards") or {}), []
    for task in tasks:
        field, names, counts = state["fields"][task], class_names[task], enrolled.setdefault(task, {})
        missing = [n for n, v in enumerate(values) if v.get(field) in (None, "")]
        if missing:
            raise UserError(f"no {field}= given for the screenshots: task {task} enrols cards by their {field} "
                            f"(e.g. {field}=\"Blueprint\", or a '{field}' in each labels entry)")
        prototypes = weights[f"heads.{task}.weight"]
        by_value: dict[str, list[int]] = {}
        for n, v in enumerate(values):
            by_value.setdefault(str(v[field]), []).append(n)
        for value, rows in by_value.items():
            new = embeddings[task][rows]
            if value in names:
                index = names.index(value)
                # An enrolled prototype is the mean of its screenshots' normalised embeddings: extend it. A
                # trained one (of any length) counts, normalised, as much as the new screenshots together.
                previous = counts.get(value, len(rows))
                old = prototypes[index].float() if value in counts else F.normalize(prototypes[index].float(), dim=0)
                prototype = (old * previous + imprint(new) * len(rows)) / (previous + len(rows))
                prototypes = prototypes.clone()
                prototypes[index] = prototype.to(prototypes.dtype)
                counts[value] = previous + len(rows)
                done.append(f"{task}: updated {value!r} with {len(rows)} images")
            else:
                prototypes = torch.cat([prototypes, imprint(new)[None].to(prototypes.dtype)])
                names.append(value)
                counts[value] = len(rows)
                done.append(f"{task}: enrolled {value!r} as class {len(names) - 1} from {len(rows)} images")
            cards[value] = {k: v for k, v in values[rows[0]].items()
                            if k not in PER_SCREENSHOT and isinstance(v, (str, int, float, bool))}
        weights[f"heads.{task}.weight"] = prototypes
    # The optimizer's state and the training weights belong to the run, whose heads no longer match.
    return ({**state, "model": weights, "class_names": class_names, "enrolled": enrolled, "cards": cards,
             "training_weights": None, "optimizer": None, "scheduler": None, "scaler": None}, done)


if __name__ == "__main__":
    main()
