"""`python -m balatro_train.bench [--steps N] [hydra overrides]`: how close the runner comes to the model.

Measures, in one process and at the same model, batch size, image size, precision and thread count:
  bare step   the configured model's training step on synthetic tensors already in memory;
  pipeline    the data pipeline alone (augment and collate the training set; no model);
  runner      the runner's real training epoch (`train_one_epoch` over the real DataLoader).
Prints a table with the ratios and writes it as JSON (`--out`, default outputs/bench/<time>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from datetime import datetime
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from balatro_train.config import CONFIG_DIR, check_config, typed_config
from balatro_train.data import build_data
from balatro_train.device import resolve_device
from balatro_train.distributed import Process
from balatro_train.errors import exit_on_user_error
from balatro_train.progress import TrainingProgress
from balatro_train.run_setup import build_run
from balatro_train.train import train_one_epoch, training_step


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed bare steps (after 3 warm-up steps)")
    parser.add_argument("--out", type=Path, help="JSON report path")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m balatro_train")
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = typed_config(compose(config_name="train", overrides=args.overrides))
    check_config(cfg)
    report = run_benchmark(cfg, args.steps)
    out = args.out or Path("outputs/bench") / f"{datetime.now():%Y-%m-%d_%H-%M-%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"written to {out}")
    return report


def run_benchmark(cfg, steps: int) -> dict:
    """The run is built as train() builds it (run_setup.build_run), and steps as train() steps."""
    torch.manual_seed(cfg.seed)
    process = Process(0, 1, resolve_device(cfg.trainer.device))
    device = process.device
    if cfg.dataset.render is not None:
        instantiate(cfg.dataset.render)
    started = time.perf_counter()
    data = build_data(cfg)
    decode_seconds = time.perf_counter() - started
    batch, size = cfg.trainer.batch_size, cfg.data.image_size

    # (a) the bare step on a batch already on the device, as the loader delivers it (uint8 NHWC)
    run = build_run(cfg, data, process)
    run.step_model.train()
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    targets = {t: torch.randint(0, len(n), (batch,), device=device) for t, n in data.class_names.items()}
    for _ in range(3):
        training_step(run, images, targets)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        training_step(run, images, targets)
    synchronize(device)
    bare = batch * steps / (time.perf_counter() - started)

    # (b) the data pipeline alone, one epoch of the real training loader
    train_loader = run.train_loader
    train_loader.sampler.set_epoch(1)
    started = time.perf_counter()
    seen = sum(len(images) for images, _ in train_loader)
    pipeline = seen / (time.perf_counter() - started)

    # (c) the runner's real epoch, on a fresh run (with the EMA update after each step where
    # trainer.ema_decay keeps one); the first one warms up allocators and workers
    run = build_run(cfg, data, process)
    runner = 0.0
    for epoch in (1, 2):
        run.train_loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        trained = train_one_epoch(run, threading.Event(), progress=TrainingProgress(f"runner epoch {epoch}"))
        for mean in trained.loss_means.values():
            mean.compute()
        runner = trained.seen / (time.perf_counter() - started)

    return {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        },
        "settings": {
            "backbone": cfg.model.backbone,
            "freeze": list(cfg.freeze.trainable or []) if cfg.freeze.trainable is not None else "none",
            "image_size": size,
            "batch_size": batch,
            "precision": str(run.precision or torch.float32).replace("torch.", ""),
            "channels_last": cfg.trainer.channels_last,
            "compile": cfg.trainer.compile,
            "train_images": len(data.train),
            "num_workers": train_loader.num_workers,
        },
        "images_per_sec": {"bare_step": round(bare, 1), "pipeline": round(pipeline, 1), "runner": round(runner, 1)},
        "pipeline_ms_per_image": round(1000 / pipeline, 3),  # with no worker process: CPU time of one core
        "ratios": {"runner_over_bare": round(runner / bare, 3), "pipeline_over_model": round(pipeline / bare, 2)},
        "decode_seconds_once": round(decode_seconds, 2),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_table(report: dict) -> None:
    s, r, q = report["settings"], report["images_per_sec"], report["ratios"]
    print(
        f"{s['backbone']} freeze={s['freeze']} {s['image_size']}px batch {s['batch_size']} {s['precision']}"
        f" channels_last={s['channels_last']} compile={s['compile']} on {report['machine']['device']}, "
        f"{report['machine']['threads']} threads"
    )
    print(f"| {'measure':<24} | {'images/s':>9} |")
    print(f"|{'-' * 26}|{'-' * 11}|")
    for name, value in (
        ("bare step", r["bare_step"]),
        ("data pipeline alone", r["pipeline"]),
        ("runner epoch", r["runner"]),
    ):
        print(f"| {name:<24} | {value:>9.1f} |")
    if s["num_workers"] == 0:
        print(f"data pipeline: {report['pipeline_ms_per_image']:.3f} ms of one core per image")
    print(
        f"runner / bare step: {q['runner_over_bare']:.3f}   pipeline / model: {q['pipeline_over_model']:.2f}x"
        f"   (one-off decode: {report['decode_seconds_once']} s)"
    )


if __name__ == "__main__":
    main()
