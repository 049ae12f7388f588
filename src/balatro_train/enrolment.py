"""Adding cards to a checkpoint without training (the library behind `python -m balatro_train.enroll` and
the open-set benchmark): every task with an embedding head gets, for each new value of its field (a new
card's name), a class whose prototype is the normalised mean embedding of its screenshots (weight
imprinting, `embedding.imprint`). A value the task already knows has its prototype updated instead: an
enrolled card's is the mean over all its screenshots so far; a trained card's prototype weighs as much as
the new screenshots together."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from balatro_train.checkpoint import Checkpoint
from balatro_train.embedding import imprint
from balatro_train.errors import UserError

PER_SCREENSHOT = {"full_path", "parent", "augmentation", "modifier"}  # labels keys that describe a screenshot


def enrolment_views(
    images: list[np.ndarray], values: list[dict], negative_view: bool = True
) -> tuple[list[np.ndarray], list[dict]]:
    """The images to embed for enrolment, with their field values: each screenshot, and with
    `negative_view` also its colour inversion (what the card looks like in, or out of, the Negative
    edition). Hue-shifted views, tried for Polychrome, lowered top-1: they are not added."""
    if not negative_view:
        return list(images), list(values)
    return ([view for image in images for view in (image, 255 - image)], [value for value in values for _ in range(2)])


def embedding_tasks(checkpoint: Checkpoint, source: str = "checkpoint") -> list[str]:
    """The checkpoint's tasks that can enrol cards (an embedding head); a UserError naming `source` if none."""
    if not checkpoint.embedding_tasks:
        raise UserError(
            f"{source}: none of its tasks has an embedding head, so cards cannot be enrolled "
            f"without training; train with tasks.identification.head=cosine"
        )
    return checkpoint.embedding_tasks


def enroll(
    checkpoint: Checkpoint, embeddings: dict[str, torch.Tensor], values: list[dict]
) -> tuple[Checkpoint, list[str]]:
    """The checkpoint with the screenshots' cards enrolled into every embedding-head task; `embeddings` are
    theirs per task (`Recognizer.embeddings`), `values` their field values (the labels entries). Returns it
    and a line per card and task saying what was done."""
    class_names = {task: list(names) for task, names in checkpoint.class_names.items()}
    enrolled = {task: dict(counts) for task, counts in checkpoint.enrolled.items()}
    cards, done, prototypes = dict(checkpoint.cards), [], {}
    for task in embedding_tasks(checkpoint):
        field, names, counts = checkpoint.fields[task], class_names[task], enrolled.setdefault(task, {})
        if any(v.get(field) in (None, "") for v in values):
            raise UserError(
                f"no {field}= given for the screenshots: task {task} enrols cards by their {field} "
                f"(e.g. {field}=\"Blueprint\", or a '{field}' in each labels entry)"
            )
        task_prototypes = checkpoint.prototypes(task)
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
                old = task_prototypes[index].float()
                old = old if value in counts else F.normalize(old, dim=0)
                task_prototypes = task_prototypes.clone()
                task_prototypes[index] = ((old * previous + imprint(new) * len(rows)) / (previous + len(rows))).to(
                    task_prototypes.dtype
                )
                counts[value] = previous + len(rows)
                done.append(f"{task}: updated {value!r} with {len(rows)} images")
            else:
                task_prototypes = torch.cat([task_prototypes, imprint(new)[None].to(task_prototypes.dtype)])
                names.append(value)
                counts[value] = len(rows)
                done.append(f"{task}: enrolled {value!r} as class {len(names) - 1} from {len(rows)} images")
            cards[value] = {
                k: v
                for k, v in values[rows[0]].items()
                if k not in PER_SCREENSHOT and isinstance(v, (str, int, float, bool))
            }
        prototypes[task] = task_prototypes
    return checkpoint.with_enrolled(prototypes, class_names, enrolled, cards), done
