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
from omegaconf import DictConfig, OmegaConf

from balatro_train.checkpoint import load_checkpoint
from balatro_train.config import CONFIG_DIR
from balatro_train.enrolment import embedding_tasks, enroll, enrolment_views
from balatro_train.errors import UserError, exit_on_user_error
from balatro_train.image_files import find_images
from balatro_train.inference import Recognizer, log_to_stderr, resolve_checkpoint
from balatro_train.labels import read_labels
from balatro_train.outputs import check_outputs

log = logging.getLogger("balatro_train.enroll")
CLI_KEYS = ("checkpoint", "images", "labels", "root", "out", "overwrite", "negative_view", "device", "batch_size")


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
    enrolled.save([out])
    log.info(
        "%d screenshots%s: %s in %.1f s; wrote %s",
        len(paths),
        " and their inverted views" if cfg.negative_view else "",
        "; ".join(added),
        time.perf_counter() - started,
        out,
    )
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
        raise UserError(
            "give images=<files, folder or glob> with name=<card name>, or labels=<labels.json> "
            "of the new cards' screenshots (one of the two)"
        )
    if cfg.labels is not None:
        samples = read_labels(cfg.labels, cfg.root)
        if not samples:
            raise UserError(f"labels={cfg.labels}: the file lists no screenshot")
        for sample in samples:
            if not sample.path.is_file():
                raise UserError(
                    f"labels={cfg.labels}: {sample.path} (entry {sample.file!r}) does not exist; fix its "
                    f"full_path or set root="
                )
        return [s.path for s in samples], [dict(s.meta) for s in samples]
    fields = {
        key: str(value)
        for key, value in OmegaConf.to_container(cfg).items()
        if key not in CLI_KEYS and value is not None
    }
    paths = find_images(cfg.images)
    return paths, [fields] * len(paths)


def load(recognizer: Recognizer, path: Path) -> np.ndarray:
    """A screenshot prepared as validation prepared the checkpoint's images; a broken file stops the enrolment."""
    try:
        return recognizer.preprocessing.load(path)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files
        raise UserError(f"{path}: not a readable image ({type(e).__name__}); fix it or leave it out") from None


if __name__ == "__main__":
    main()
