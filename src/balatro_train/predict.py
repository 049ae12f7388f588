"""`python -m balatro_train.predict checkpoint=<file or run folder> images=<image, folder or glob>`

Prints (or writes to `out`) one JSON object keyed by image file name, in the shape the
annotation tool reads to pre-fill its labels:

    {"card.png": {"raw":    {"identification": {"indices": [3, 0, 1], "probs": [0.91, 0.05, 0.02]}},
                  "labels": {"identification": [{"label": "The Fool", "probability": 0.91}, ...]}}}

`raw` is the model's top-k as is; `threshold` only drops entries from `labels`.

`out` is never the checkpoint or one of the images (refused, whatever `overwrite` says), and an
existing file only with overwrite=true (balatro_train/outputs.py); it is written atomically.

A task with an embedding head (tasks.<task>.head=cosine) adds the image's best cosine to a class
prototype and the threshold it is held to (the checkpoint's calibrated one, or `unknown_threshold`)
to `raw`; below it, `labels` starts with "unknown" and its score, then the nearest known cards:

    "raw":    {"identification": {"indices": [...], "probs": [...], "score": 0.41, "threshold": 0.62}},
    "labels": {"identification": [{"label": "unknown", "score": 0.41},
                                  {"label": "The Fool", "probability": 0.35}, ...]}
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from balatro_train.atomic import save_bytes
from balatro_train.config import CONFIG_DIR
from balatro_train.embedding import UNKNOWN
from balatro_train.errors import UserError, exit_on_user_error
from balatro_train.image_files import find_images
from balatro_train.inference import Recognizer, log_to_stderr, resolve_checkpoint
from balatro_train.outputs import check_outputs

log = logging.getLogger("balatro_train.predict")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    log_to_stderr()
    predict(cfg)


def predict(cfg: DictConfig) -> dict:
    if cfg.topk < 1:
        raise UserError(f"topk={cfg.topk} must be at least 1")
    if cfg.threshold is not None and not 0.0 <= cfg.threshold <= 1.0:
        raise UserError(f"threshold={cfg.threshold} must be a probability between 0 and 1")
    checkpoint = resolve_checkpoint(cfg.checkpoint)  # first: the cheaper mistake to report
    paths = find_images(cfg.images)
    out = Path(cfg.out) if cfg.out else None
    if out:  # before loading the model: a refused out= costs nothing
        check_outputs("out", cfg.out, [(out, "")], inputs(checkpoint, paths, cfg.images), cfg.get("overwrite", False))
    recognizer = Recognizer.from_checkpoint(checkpoint, cfg.device, cfg.batch_size, cfg.get("unknown_threshold"))
    images, kept = [], []
    for path in paths:
        try:
            images.append(recognizer.preprocessing.load(path))
            kept.append(path)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files: skip, say so
            log.warning("skipping %s: not a readable image (%s)", path, type(e).__name__)
    if not kept:
        raise UserError(f"images={cfg.images}: none of the {len(paths)} matched files is a readable image")
    log.info("predicting %d images on %s", len(kept), recognizer.device)
    logits = recognizer.logits(images)
    top = recognizer.top_k({task: values.softmax(dim=1) for task, values in logits.items()}, cfg.topk)
    scores = recognizer.max_cosines(logits)
    result = {}
    for n, key in enumerate(result_keys(kept)):
        raw, labels = {}, {}
        for task, per_image in top.items():
            indices, probs = per_image[n]
            raw[task] = {"indices": indices, "probs": probs}
            labels[task] = [
                {"label": recognizer.class_names[task][i], "probability": p}
                for i, p in zip(indices, probs, strict=True)
                if cfg.threshold is None or p >= cfg.threshold
            ]
            if task in scores:
                score, threshold = scores[task][n].item(), recognizer.thresholds[task]
                raw[task].update(score=score, threshold=threshold)
                if score < threshold:
                    labels[task].insert(0, {"label": UNKNOWN, "score": score})
        result[key] = {"raw": raw, "labels": labels}
    text = json.dumps(result, indent=1)
    if out:
        save_bytes((text + "\n").encode(), out)
        log.info("wrote predictions for %d images to %s", len(result), out)
    else:
        try:
            print(text, flush=True)
        except BrokenPipeError:  # `... | head`: the reader has gone, which is not an error
            sys.stdout = open(os.devnull, "w")
    return result


def inputs(checkpoint: Path, images: list[Path], spec) -> list[tuple[Path, str]]:
    """What predict reads, as outputs.check_outputs names them."""
    return [
        (checkpoint, f"the checkpoint it reads (checkpoint={checkpoint})"),
        *((path, f"the image {path} it reads (images={spec})") for path in images),
    ]


def result_keys(paths: list[Path]) -> list[str]:
    """File names, as labels.json keys them; the paths themselves when two names collide."""
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


if __name__ == "__main__":
    main()
