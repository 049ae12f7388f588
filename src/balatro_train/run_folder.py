"""One run, one folder: runs started together get folders of their own, and a run never writes into a
folder that already holds another run.

* `new_folder`, the `${new_folder:...}` resolver of conf/train.yaml's `hydra.run.dir` and
  `hydra.sweep.dir`: the folder named by the date and time, created on the spot (mkdir is atomic), or
  `<time>_2`, `_3`, ... when another run took that name in the same second.
* `check_run_folder`: a folder holds a run once it has `metrics.jsonl` or `checkpoints/`; only the run
  that resumes one of its checkpoints may write there again. `train()` checks its `out_dir`, and
  `RunFolderGuard` (a Hydra callback) checks an explicit `hydra.run.dir` before Hydra writes its
  `.hydra/` there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from balatro_train.errors import UserError


def new_folder(path: str) -> str:
    """`path`, created now, or the first of `path_2`, `path_3`, ... that no other run has taken.
    OmegaConf caches a resolver's value in the config (and Hydra copies that cache into every sweep
    job's config, as it does for `${now:...}`), so a config resolves to one folder however often it is read."""
    for n in range(1, 1000):
        candidate = Path(path if n == 1 else f"{path}_{n}")
        candidate.parent.mkdir(parents=True, exist_ok=True)
        try:
            candidate.mkdir()
            return str(candidate)
        except FileExistsError:
            continue
    raise UserError(f"{path}: 1000 runs started in the same second; give hydra.run.dir= explicitly")


OmegaConf.register_new_resolver("new_folder", new_folder, use_cache=True, replace=True)


def holds_a_run(folder: Path) -> bool:
    return (folder / "metrics.jsonl").is_file() or (folder / "checkpoints").is_dir()


def resumes_from(folder: Path, resume: str | None) -> bool:
    return resume is not None and Path(folder).resolve() in Path(resume).resolve().parents


def check_run_folder(folder: Path, resume: str | None) -> None:
    """Refuse a folder that holds another run: its metrics.jsonl, checkpoints and TensorBoard events would
    be mixed with this run's. Only a run resuming from one of that folder's checkpoints may go on in it."""
    if holds_a_run(folder) and not resumes_from(folder, resume):
        raise UserError(f"{folder} already holds a run (metrics.jsonl, checkpoints/): to continue it, add "
                        f"resume={Path(folder) / 'checkpoints' / 'last.pt'}; to start another, give a new "
                        f"hydra.run.dir= (or leave it out: each run then gets a folder of its own)")


class RunFolderGuard(Callback):
    """conf/train.yaml's callback: a single run whose hydra.run.dir holds another run stops with one line
    and exit code 2 before Hydra writes its .hydra/ and log there. Under torchrun the first process
    checks for all (the others would find the folder that it has just started)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        try:
            check_run_folder(Path(str(config.hydra.run.dir)), config.get("resume"))
        except UserError as e:
            print(f"[balatro_train][ERROR] - {e}", file=sys.stderr)  # Hydra has not set logging up yet
            sys.exit(2)
