"""Writing a file so that a crash, a kill or a full disk at any moment leaves the previous file whole:
the one way balatro-train writes checkpoints and the tools' outputs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from balatro_train.errors import UserError


def save_bytes(data, path: Path) -> None:
    """Write `data` to `path` through a temporary file beside it, fsynced, renamed over `path`, and the
    folder fsynced so that the rename itself survives a crash. A full disk or a folder that cannot be
    written is a UserError: `path` as it was before stays whole, and no temporary file is left."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_folder(path.parent)
    except OSError as e:
        before = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise UserError(
            f"{path}: could not be written ({e.strerror or type(e).__name__}); {before}. Free some "
            f"disk space or fix the folder's permissions, then run again"
        ) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def fsync_folder(folder: Path) -> None:
    if os.name == "nt":  # Windows cannot open a folder for fsync; NTFS journals the rename itself
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_file_atomically(source: Path, target: Path) -> None:
    """Publish a checkpoint where downstream tools read it, never leaving a half-copied file."""
    save_bytes(source.read_bytes(), target)
