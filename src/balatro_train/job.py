"""What a Hydra job adds around `train()`: the plumbing, kept out of the training story.

`python -m balatro_train` runs `train.main`, Hydra's task function, which hands the composed
config to `run_hydra_job` here. This module decides, from Hydra's runtime, what `train(cfg,
out_dir, stop, hparams)` itself never looks at:

* where the run writes (Hydra's output folder) and how many CPU threads it gets (its share of
  the cores when a launcher runs jobs side by side, or torchrun starts several processes);
* Ctrl-C and SIGTERM: the first asks the loop to stop at the next step and save last.pt, a
  second quits at once;
* a sweep job started again in its own folder (a SLURM requeue) resumes from its own last.pt, and a
  job whose folder holds another job's run (a sweep relaunched into an old folder) is refused;
* failures: a single run exits 2 with one line for a mistake the user can fix; in a sweep, any
  failing job leaves `error.txt` and returns NaN so that the other jobs still run;
* a single run publishes its best checkpoint to `publish_to` (sweeps never do), a path checked before
  training;
* what TensorBoard's HPARAMS view shows of the job: its group choices and overridden keys, which of
  them the sweep varies, and the name of its TensorBoard folder (its swept overrides).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from balatro_train.atomic import copy_file_atomically
from balatro_train.checkpoint import load_checkpoint
from balatro_train.config import typed_config
from balatro_train.distributed import is_first_process, leave
from balatro_train.errors import Interrupted, UserError, user_error_in
from balatro_train.resume import first_difference
from balatro_train.run_log import HParams, hparam_value, main_values

log = logging.getLogger("balatro_train")


def run_hydra_job(cfg: DictConfig, train: Callable[..., float]) -> float:
    """Run `train` as the current Hydra job; returns the best combined validation loss (NaN for a
    failed sweep job), which is what sweepers minimise."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    torch.set_num_threads(threads_for_this_process(hydra_cfg.launcher.get("n_jobs") if in_sweep else 1))
    (out_dir / "error.txt").unlink(missing_ok=True)  # an earlier start's failure: this start decides anew
    try:
        if in_sweep and cfg.resume is None:
            resume_own_start(cfg, out_dir)
        if cfg.publish_to and not in_sweep and is_first_process():
            check_publish_target(Path(cfg.publish_to))  # before training, not after it
        with stop_on_signals() as stop:
            best_loss = train(cfg, out_dir, stop=stop, hparams=hparams(cfg, hydra_cfg, out_dir))
    except Interrupted as e:
        log.warning("%s", e)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001  (in a sweep, one broken combination must not stop the others)
        if user_error_in(e) is not None:
            log.error("%s", user_error_in(e))
            if not in_sweep:
                sys.exit(2)
            error = str(user_error_in(e))
        elif not in_sweep:
            raise
        else:
            log.exception("job failed")
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    else:
        if cfg.publish_to and not in_sweep and is_first_process():
            publish(out_dir / "checkpoints" / "best.pt", Path(cfg.publish_to))
        return best_loss
    finally:
        leave()
    # A failed sweep job leaves its one-line error for the sweep summary and reports NaN,
    # which sweepers (Optuna included) treat as a failed trial.
    (out_dir / "error.txt").write_text(error + "\n")
    return math.nan


def resume_own_start(cfg: DictConfig, job_dir: Path) -> None:
    """A sweep job started again in its folder (a SLURM requeue) resumes from the last.pt it left there,
    but only when that is this job's own run: a sweep relaunched into an old sweep folder, with other
    settings, would otherwise go on with the old job's optimizer state and report the old job's loss."""
    own_last = job_dir / "checkpoints" / "last.pt"
    if not own_last.is_file():
        return
    difference = first_difference(
        load_checkpoint(own_last, "resume").config, OmegaConf.to_container(typed_config(cfg), resolve=True)
    )
    if difference:
        key, old, new = difference
        raise UserError(
            f"sweep job {job_dir} holds an earlier job whose {key} is {old} (this one: {new}); run the "
            f"sweep into a new folder (leave hydra.sweep.dir= out, or give another)"
        )
    log.info("resuming from %s, left by an earlier start of this job", own_last)
    cfg.resume = str(own_last)


def check_publish_target(target: Path) -> None:
    """publish_to must be a file that can be written: found out now, not after the whole run has trained."""
    if target.is_dir():
        raise UserError(
            f"publish_to={target} is a folder; give a file path, e.g. {target / 'best_model.pt'}, or publish_to=null"
        )
    existing = next(folder for folder in target.absolute().parents if folder.exists())
    if not existing.is_dir():
        raise UserError(
            f"publish_to={target}: {existing} is a file, not a folder; give another path or publish_to=null"
        )
    if not os.access(existing, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UserError(
            f"publish_to={target}: {target if target.exists() else existing} is not writable; give "
            f"another path or publish_to=null"
        )


def publish(best: Path, target: Path) -> None:
    if not best.is_file():
        log.warning("nothing published to %s: this run has no %s", target, best)
        return
    copy_file_atomically(best, target)
    log.info("published the best model to %s", target)


@contextlib.contextmanager
def stop_on_signals():
    """The first Ctrl-C or SIGTERM asks the loop to stop at the next step; a second one quits at once.
    The previous handlers come back afterwards (the next job of a sweep installs its own)."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():
            os._exit(130)
        stop.set()
        log.warning(
            "%s: stopping after this step and saving last.pt (again to quit at once)", signal.Signals(signum).name
        )

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def threads_for_this_process(parallel_jobs: int | None = 1) -> int:
    """This process's share of the cores, so that processes running side by side never
    oversubscribe them: jobs a launcher runs at once (hydra/launcher=joblib n_jobs=N, -1 for one
    per core) and the processes torchrun starts on this machine (LOCAL_WORLD_SIZE) split them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parallel_jobs = parallel_jobs or 1
    parallel_jobs = cores if parallel_jobs < 0 else parallel_jobs
    processes_per_job = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // (parallel_jobs * processes_per_job))


def hparams(cfg: DictConfig, hydra_cfg, out_dir: Path) -> HParams:
    """What TensorBoard's HPARAMS view shows of this job: every config group's choice, the main numbers
    and every key overridden on the command line, with the values (and types) they have in the composed
    config; the keys its sweep varies, first; its TensorBoard folder named after its swept overrides
    (`optimizer=group,freeze=all`; a single run writes into tb/ itself)."""
    choices = {
        group: choice
        for group, choice in hydra_cfg.runtime.choices.items()
        if choice is not None and not group.startswith("hydra")
    }
    values = {**main_values(cfg), **choices}
    overrides = {}
    for override in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)):
        key = override.key_or_group
        if override.is_hydra_override() or override.is_delete() or key.startswith("hydra"):
            continue
        overrides[key] = override.input_line
        if key not in choices:
            values[key] = hparam_value(OmegaConf.select(cfg, key, default=None))
    if hydra_cfg.mode != RunMode.MULTIRUN:  # a single run: what its command line changed
        return HParams(values, tuple(overrides))
    swept = tuple(key for key in overrides if key in swept_keys(hydra_cfg, out_dir))
    name = ",".join(overrides[key] for key in swept).replace(os.sep, "_")[:200]
    return HParams(values, swept, name)


def swept_keys(hydra_cfg, out_dir: Path) -> set[str]:
    """The keys a sweep varies: those of its sweeper's `params` (Optuna's search space, a benchmark's
    seeds) and the command line's sweeps (`optimizer=simple,group`), read from the multirun.yaml that
    Hydra's sweeper left in the sweep folder."""
    keys = set(OmegaConf.select(hydra_cfg, "sweeper.params", default=None) or {})
    for folder in list(out_dir.parents)[:2]:
        if (folder / "multirun.yaml").is_file():
            try:
                task = OmegaConf.load(folder / "multirun.yaml").hydra.overrides.task
                keys |= {
                    o.key_or_group
                    for o in OverridesParser.create().parse_overrides(list(task))
                    if o.is_sweep_override()
                }
            except Exception as e:  # noqa: BLE001  (HPARAMS then just won't tick the swept keys first)
                log.debug("could not read the sweep's overrides from %s: %s", folder / "multirun.yaml", e)
            break
    return keys
