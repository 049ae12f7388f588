"""Where the tools (predict, export, enroll) write their results: the one rule they share.

An output never replaces one of the command's inputs (the checkpoint it reads, an image, a labels
file), not even with `overwrite=true`: `predict ... out=best.pt` once turned the model it read into a
JSON file. It replaces another existing file only with `overwrite=true`: a mistyped `out=` (or a
second export to the same default) would otherwise rewrite `labels.json` or an earlier result
without a word. Checked before any work, so a refusal costs nothing; the file is then written
atomically (`checkpoint.save_bytes`), so an interrupted write leaves the previous file whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from balatro_train.errors import UserError


def check_outputs(
    key: str, value: str, outputs: Iterable[tuple[Path, str]], inputs: Iterable[tuple[Path, str]], overwrite: bool
) -> None:
    """Refuse, in one line naming `key=value` (the path given, or the default taken, as the user should
    read it), to write any of `outputs` over one of `inputs`, always, or over another existing file
    unless `overwrite`. `outputs`: (path, role), role "" for the file `key` names, else what the file
    beside it is ("its sidecar"); `inputs`: (path, what it is, e.g. "the checkpoint it reads (checkpoint=x)")."""
    inputs = list(inputs)
    for path, role in outputs:
        written = f"{key}={value}" + (f" would write {role} {path}, which" if role else "")
        if path.is_dir():
            raise UserError(f"{written} is a folder; give {key}= a file path")
        if not path.exists():
            continue  # every input exists, so a path that does not cannot be one
        for source, what in inputs:
            if source.exists() and os.path.samefile(path, source):  # through symlinks and hard links too
                raise UserError(
                    f"{written} is {what}: outputs never replace inputs, not even with "
                    f"overwrite=true; give another {key}="
                )
        if not overwrite:
            raise UserError(f"{written} already exists; give another {key}=, or add overwrite=true to replace it")
