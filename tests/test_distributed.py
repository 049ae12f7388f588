"""DDP on CPU: torchrun with two gloo processes trains like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import compose, own_core, tiny_overrides

from balatro_train.train import train


def test_two_process_ddp_matches_a_single_process_run(dataset, tmp_path):
    data, root = dataset
    # A frozen backbone keeps BatchNorm on its running statistics, so per-process batches
    # compute exactly what the global batch computes and the runs must agree closely.
    args = [*tiny_overrides(data, root), "freeze=all", "trainer.epochs=2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside the other xdist worker; the single process's numbers do not depend on it
    try:  # the one-process run to compare with, in this process
        train(compose(args), tmp_path / "outputs/single")
    finally:
        torch.set_num_threads(threads)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "balatro_train",
            *args,
            "hydra.run.dir=outputs/ddp",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "8"},
        preexec_fn=own_core(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # each process takes its share of the cores (torchrun's OMP_NUM_THREADS=1 was overridden before)
    cores = len(os.sched_getaffinity(0)) if own_core() is None else 1  # pinned to one core beside another worker
    assert (
        f"distributed: 2 processes, backend gloo, {max(1, cores // 2)} CPU threads per process"
        in result.stdout + result.stderr
    )

    ddp, single = tmp_path / "outputs/ddp", tmp_path / "outputs/single"
    assert len(list((ddp / "tb").rglob("events.out.tfevents.*"))) == len(list((single / "tb").rglob("events.*")))
    rows = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for row, want in zip(rows, expected, strict=True):
        for key in ("train_loss", "val_loss", "identification/top1_acc", "modifier/top1_acc", "identification/f1"):
            assert row[key] == pytest.approx(want[key], abs=1e-4), key
    assert (ddp / "checkpoints/best.pt").is_file()
