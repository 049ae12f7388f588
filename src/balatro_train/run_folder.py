"""One run, one folder: runs started together get folders of their own, and a run never writes into a
folder that already holds another run.

`RunFolderGuard`, a Hydra callback of conf/train.yaml, runs before Hydra makes a job's folder:

* a run or a sweep whose folder comes from the config (`outputs/<date>/<time>`) claims it with
  `new_folder` (mkdir is atomic): `<time>_2`, `_3`, ... when another run took that name in the same
  second. A sweep's claimed folder is added to its Hydra overrides, since each job composes its own
  config anew.
* a run given `hydra.run.dir=` explicitly is checked by `check_run_folder`: a folder holds a run once it
  has `metrics.jsonl` or `checkpoints/`, and only a run resuming one of its checkpoints may go on in it.
  `train()` checks its `out_dir` the same way.

(Done in a callback, not in a resolver of `hydra.run.dir`: Hydra resolves that value again at every merge
of a config onto it, so a resolver that makes folders would leave empty ones behind.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from balatro_train.errors import UserError


def new_folder(path: str) -> str:
    """`path`, made now, or the first of `path_2`, `path_3`, ... that no other run has taken."""
    for n in range(1, 1000):
        candidate = Path(path if n == 1 else f"{path}_{n}")
        candidate.parent.mkdir(parents=True, exist_ok=True)
        try:
            candidate.mkdir()
            return str(candidate)
        except FileExistsError:
            continue
    raise UserError(f"{path}: 1000 runs started in the same second; give hydra.run.dir= explicitly")


def holds_a_run(folder: Path) -> bool:
    return (folder / "metrics.jsonl").is_file() or (folder / "checkpoints").is_dir()


def resumes_from(folder: Path, resume: str | None) -> bool:
    return resume is not None and Path(folder).resolve() in Path(resume).resolve().parents


def check_run_folder(folder: Path, resume: str | None) -> None:
    """Refuse a folder that holds another run: its metrics.jsonl, checkpoints and TensorBoard events would
    be mixed with this run's. Only a run resuming from one of that folder's checkpoints may go on in it."""
    if holds_a_run(folder) and not resumes_from(folder, resume):
        raise UserError(
            f"{folder} already holds a run (metrics.jsonl, checkpoints/): to continue it, add "
            f"resume={Path(folder) / 'checkpoints' / 'last.pt'}; to start another, give a new "
            f"hydra.run.dir= (or leave it out: each run then gets a folder of its own)"
        )


def given_on_command_line(config: DictConfig, key: str) -> bool:
    return any(override.split("=", 1)[0].lstrip("+~") == key for override in config.hydra.overrides.hydra)


class RunFolderGuard(Callback):
    """See the module docstring. Under torchrun only the first process acts (the others would find the
    folder that it has just started); torchrun runs want an explicit hydra.run.dir anyway."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        if not given_on_command_line(config, "hydra.run.dir"):
            with read_write(config.hydra):
                config.hydra.run.dir = new_folder(str(config.hydra.run.dir))
            return
        try:
            check_run_folder(Path(str(config.hydra.run.dir)), config.get("resume"))
        except UserError as e:
            print(f"[balatro_train][ERROR] - {e}", file=sys.stderr)  # Hydra has not set logging up yet
            sys.exit(2)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if given_on_command_line(config, "hydra.sweep.dir"):
            return  # a sweep relaunched into its folder: each job checks its own (job.resume_own_start)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = new_folder(str(config.hydra.sweep.dir))
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={config.hydra.sweep.dir}")
