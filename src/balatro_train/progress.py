"""The terminal's progress bars: what a user watching a run sees between two epoch lines.

A bar is drawn on stderr only where there is a usable terminal, with log records printed above it, so
that neither a log file nor a batch job's output ever holds bar fragments.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

STEP_LOSS = "train_steps/loss"  # the TensorBoard tag of the step-level training loss
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


def bar_columns(stream) -> int | None:
    """The width to draw a bar at on `stream`; None where there is no usable terminal (a file, a pipe,
    a batch job's output, TERM=dumb): then no bar and no output at all. A terminal that reports 0
    columns (a pseudo-terminal whose size was never set) gets 80 rather than a bar with no bar."""
    try:
        if not stream.isatty() or os.environ.get("TERM") == "dumb":
            return None
    except (AttributeError, ValueError):  # no isatty, or closed
        return None
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return columns - 1 if columns > 1 else 79


@contextlib.contextmanager
def bar_for(iterable, desc: str, show: bool = True, **kwargs):
    """A tqdm bar on stderr where there is a terminal (else the iterable itself, and None). Log records
    printed meanwhile go above the bar, never through it (the log file never sees the bar)."""
    columns = bar_columns(sys.stderr) if show else None
    if columns is None:
        yield iterable, None
        return
    with (
        logging_redirect_tqdm(),
        tqdm(
            iterable,
            desc=desc,
            leave=False,
            file=sys.stderr,
            ncols=columns,
            bar_format=BAR_FORMAT,
            dynamic_ncols=False,
            **kwargs,
        ) as bar,
    ):
        yield bar, bar


def progress_bar(iterable, desc: str, show: bool = True):
    with bar_for(iterable, desc, show) as (items, _):
        yield from items


@dataclass
class TrainingProgress:
    """One training epoch's bar and step-level loss. Every `every` optimizer steps, and at the epoch's
    last, it reads the running loss sums back from the device once (a host sync): the bar shows the
    running mean of the combined loss (the number the epoch line reports as train_loss) and images/s,
    and TensorBoard gets the combined loss of the steps since the last read (train_steps/loss, at the
    run's optimizer step). With no terminal and no writer (other processes) nothing is read back."""

    desc: str = "training"
    combine: Any = max
    every: int = 20
    epoch: int = 1
    world: int = 1
    writer: Any = None
    show: bool = True
    bar: Any = field(default=None, init=False)

    def over(self, loader, seen: int = 0):
        """Iterates the loader's batches, starting at image `seen` of the epoch (after an interrupt)."""
        self.step = seen // loader.batch_size
        self.total = self.step + len(loader)
        self.started, self.seen_at_start, self.last = time.perf_counter(), seen, None
        with bar_for(None, self.desc, self.show, initial=self.step, total=self.total) as (_, self.bar):
            yield from loader

    def after_step(self, loss_means: dict, seen: int) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.update()  # drawn at tqdm's own pace (10 times a second at most)
        if (self.bar is None and self.writer is None) or (self.step % self.every and self.step != self.total):
            return
        sums = torch.stack([torch.stack([m.mean_value, m.weight]) for m in loss_means.values()]).cpu()  # the sync
        running = self.combine((sums[:, 0] / sums[:, 1]).tolist())  # as MeanMetric.compute, then epoch_row, do
        sums = sums.double().numpy()
        if self.writer is not None:
            since = sums - (self.last if self.last is not None else np.zeros_like(sums))
            if all(count > 0 for _, count in since):
                self.writer.add_scalar(
                    STEP_LOSS, self.combine([float(t / c) for t, c in since]), (self.epoch - 1) * self.total + self.step
                )
            self.last = sums
        if self.bar is not None:
            rate = (seen - self.seen_at_start) * self.world / max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix_str(f"loss {running:.4f}, {rate:.0f} img/s", refresh=True)
