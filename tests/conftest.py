"""Shared test helpers, defined here only: a tiny, easy labelled dataset in the annotation tool's
format; a runner that calls `python -m balatro_train` in a subprocess exactly as a user would; the
in-process layer (the config composed with Hydra's compose API, for calling the runner's functions
directly); readers of what a run leaves (metrics.jsonl, a checkpoint's validation outputs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import hydra
import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from balatro_train.checkpoint import load_checkpoint
from balatro_train.config import CONFIG_DIR
from balatro_train.data import build_data

try:
    import fcntl
except ImportError:  # Windows: each xdist worker makes its own copy of a shared fixture's folder
    fcntl = None

REPO = Path(__file__).resolve().parents[1]
NAMES = ["Joker_001", "Joker_002", "The Fool", "Mercury"]
MODIFIERS = ["Base", "Foil", "Negative"]
COLOURS = {"Joker_001": (200, 40, 40), "Joker_002": (40, 200, 40), "The Fool": (40, 40, 200), "Mercury": (200, 200, 40)}


def card_image(name: str, modifier: str, rng: np.random.Generator, size=(36, 48)) -> Image.Image:
    """A flat card whose colour says the name and whose pattern says the modifier: easy to learn."""
    w, h = size
    image = np.zeros((h, w, 3), np.float32) + COLOURS[name]
    if modifier == "Foil":
        image[::4] = (220, 220, 255)
    if modifier == "Negative":
        image = 255 - image
    image += rng.normal(0, 8, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_dataset(root: Path, per_class: int | dict[str, int] = 4, augmented_per_image: int = 1, seed: int = 0) -> dict:
    """labels.json with full_path relative to `root` (as the annotation tool writes them),
    plus augmented.json of RGBA rotated copies. Returns the paths as dataset.* overrides.
    `per_class`: originals per name, the same for all or {name: count} (an imbalanced set)."""
    rng = np.random.default_rng(seed)
    counts = per_class if isinstance(per_class, dict) else {name: per_class for name in NAMES}
    originals, augmented = {}, {}
    (root / "dataset_default").mkdir(parents=True, exist_ok=True)
    (root / "augmented").mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        for i in range(counts[name]):
            modifier = MODIFIERS[i % len(MODIFIERS)]
            file = f"{name.replace(' ', '_')}_{i}.png"
            image = card_image(name, modifier, rng)
            image.save(root / "dataset_default" / file)
            originals[file] = {
                "name": name,
                "type": "Joker" if "Joker" in name else "Tarot",
                "rarity": "Common",
                "modifier": modifier,
                "full_path": f"dataset_default/{file}",
            }
            for k in range(augmented_per_image):
                aug_file = f"aug_{k}_{file}"
                image.convert("RGBA").rotate(10 + 5 * k, expand=True).save(root / "augmented" / aug_file)
                augmented[aug_file] = {
                    **originals[file],
                    "full_path": f"augmented/{aug_file}",
                    "parent": file,
                    "augmentation": f"rotate_{10 + 5 * k}",
                }
    (root / "dataset_default" / "labels.json").write_text(json.dumps(originals, indent=1))
    (root / "augmented" / "augmented.json").write_text(json.dumps(augmented, indent=1))
    return {"labels_file": root / "dataset_default" / "labels.json", "augmented": root / "augmented" / "augmented.json"}


def tiny_overrides(data: dict, root: Path, precision: str | None = "32") -> list[str]:
    """A fast, real training run: 32 px images, small batches, a few epochs. fp32 unless asked:
    `precision=None` keeps the default, trainer.precision=auto (bf16 autocast on a CPU with
    AVX-512 BF16 or AMX, fp32 elsewhere). No EMA of the weights: a run of a dozen steps is far
    shorter than the default's memory (1 / (1 - 0.99) = 100 steps); tests/test_recipe.py tests it."""
    return [
        "dataset=annotated",
        f"dataset.labels_file={data['labels_file']}",
        f"dataset.augmented_labels_files=[{data['augmented']}]",
        f"dataset.root={root}",
        "data.image_size=32",
        "model.pretrained=false",
        "trainer.batch_size=8",
        "trainer.epochs=3",
        "trainer.ema_decay=0",
        *([f"trainer.precision={precision}"] if precision else []),
        "trainer.num_workers=0",
        "optimizer.lr=3e-3",
    ]


def own_core():
    """For subprocess's preexec_fn: the suite runs two xdist workers on two cores, and the runner takes
    every core it may use for its threads, so each worker's command lines are pinned to a core of
    their own; two runs side by side would otherwise oversubscribe the cores, which slows both far
    more than twice."""
    worker, cores = os.environ.get("PYTEST_XDIST_WORKER", ""), sorted(os.sched_getaffinity(0))
    if not worker.startswith("gw") or len(cores) < 2:
        return None
    core = cores[int(worker[2:]) % len(cores)]
    return lambda: os.sched_setaffinity(0, {core})


def run_cli(
    args: list[str], cwd: Path, module: str = "balatro_train", check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=own_core(),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def hydra_main(module, args: list[str], monkeypatch) -> int:
    """A command line's Hydra entry point (`module.main`) run in this process as `python -m ...`; its exit code."""
    monkeypatch.setattr(sys, "argv", [module.__name__, *args])
    # A training job takes the cores it may use for its threads (job.py): as for run_cli's command lines,
    # each xdist worker's calls get a core of their own; threads and cores are given back after.
    threads, pin = torch.get_num_threads(), own_core()
    cores = os.sched_getaffinity(0) if pin else None
    if pin:
        pin()
    try:
        module.main()
    except SystemExit as e:
        return e.code or 0
    finally:
        torch.set_num_threads(threads)
        if cores:
            os.sched_setaffinity(0, cores)
    return 0


def run_dirs(cwd: Path) -> list[Path]:
    """Single-run folders, oldest first (outputs/<date>/<time>/)."""
    return sorted(p for p in (cwd / "outputs").glob("*/*") if (p / ".hydra").is_dir() and "multirun" not in p.parts)


def made_once(tmp_path_factory, name: str, make) -> Path:
    """The folder `name`, filled by `make(folder)` once per test session and shared by the tests of a
    module-scoped fixture: under pytest-xdist the first worker makes it, the others wait and reuse it."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER") and fcntl is not None:
        shared = shared.parent  # pytest-N/: this session's workers, no other session's
    work = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (work / ".made").is_file():
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            make(work)
            (work / ".made").touch()
    return work


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "labelled"
    return write_dataset(root), root


# ---- the in-process layer: the runner's functions called directly on a composed config ----------


def compose(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    """conf/train.yaml composed as `python -m balatro_train <overrides>` would, without Hydra's runtime
    (with `hydra_config`, its `hydra` node too)."""
    with hydra.initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra.compose("train", overrides=overrides, return_hydra_config=hydra_config)


@pytest.fixture
def tiny_cfg(dataset):
    """Composes the tiny run's config (fixture `dataset`, `tiny_overrides`) plus extra overrides:
    `tiny_cfg("freeze=all", precision=None)`."""
    data, root = dataset

    def make(*overrides: str, precision: str | None = "32") -> DictConfig:
        return compose([*tiny_overrides(data, root, precision), *overrides])

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """The suite runs two xdist workers on two cores: in-process training with two torch threads per
    worker would oversubscribe them. Use it as a module's autouse fixture; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- what a run leaves ------------------------------------------------------------------------------

TIMING_KEYS = frozenset({"epoch_seconds", "train_images_per_sec"})  # the metrics that differ between equal runs


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows, timing included."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def assert_same_metrics(a: list[dict], b: list[dict], abs: float = 1e-6) -> None:
    """Same epochs, same keys, every number within `abs` (0: bit-identical); timing keys ignored."""
    a, b = without_timing(a), without_timing(b)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], abs=abs, rel=0), (ra["epoch"], key)


def validation_outputs(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The checkpoint's model on its run's validation images, recomputed here in fp32 from the saved
    config, class names and split: ({task: logits}, {task: targets})."""
    state = load_checkpoint(checkpoint)
    cfg = OmegaConf.create(state.config)
    data = build_data(cfg, state.class_names, state.split)
    model = state.model()
    images = torch.stack([data.val[i][0] for i in range(len(data.val))])
    with torch.no_grad():
        return model(images), data.val.targets


# ---- command lines in this process, and the cosine-head model shared by test_openset and test_outputs ---


def run_main(module, args: list[str], monkeypatch, capsys) -> SimpleNamespace:
    """`hydra_main` with what the command printed: .returncode, .stdout, .stderr as run_cli's result has them
    (capsys: the test's; what was printed before this call is dropped)."""
    capsys.readouterr()
    code = hydra_main(module, args, monkeypatch)
    printed = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=printed.out, stderr=printed.err)


NEW_CARD = "Mercury"  # the card the cosine model never saw
# Flat-coloured cards of one edition separate in a cosine head within a few dozen steps; label smoothing
# would stop the true class's cosine early (it caps the logit gap), so it is off for this tiny model.
COSINE = [
    "task=identification",
    "tasks.identification.head=cosine",
    "tasks.identification.label_smoothing=0",
    "trainer.epochs=25",
    "trainer.patience=0",
    "scheduler=cosine",
    "publish_to=null",
]


def write_cards(root: Path, per_card: int = 8) -> Path:
    """labels.json of `per_card` Base screenshots of each tiny card; returns its path."""
    rng, labels = np.random.default_rng(0), {}
    (root / "cards").mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        for i in range(per_card):
            file = f"{name.replace(' ', '_')}_{i}.png"
            card_image(name, "Base", rng).save(root / "cards" / file)
            labels[file] = {
                "name": name,
                "type": "Planet" if name == NEW_CARD else "Joker",
                "rarity": "Common",
                "modifier": "Base",
                "full_path": f"cards/{file}",
            }
    (root / "cards" / "labels.json").write_text(json.dumps(labels, indent=1))
    return root / "cards" / "labels.json"


def never_seen_cards() -> dict[str, np.ndarray]:
    """Images unlike any of the flat-coloured cards. A model trained for a few dozen steps on three flat
    colours has a rough embedding, so not every one of them falls below its threshold, but some do."""
    rows, columns = np.indices((48, 36))
    stripes = lambda mask: np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)  # noqa: E731
    return {
        "stripes": stripes(columns % 6 == 0),
        "bands": stripes(rows % 6 == 0),
        "checker": stripes((rows + columns) // 4 % 2 == 1),
        "grey": np.full((48, 36, 3), 128, np.uint8),
        "white": np.full((48, 36, 3), 255, np.uint8),
        "black": np.zeros((48, 36, 3), np.uint8),
        "noise": np.random.default_rng(0).integers(0, 256, (48, 36, 3), dtype=np.uint8),
    }


def cosine_model_folder(tmp_path_factory) -> Path:
    """A cosine-head model (COSINE, 32 px) trained in-process on three of the four tiny cards, not NEW_CARD:
    <folder>/run/checkpoints/best.pt, its screenshots <folder>/labelled/cards/ (every card, labels.json) and
    never_seen_<name>.png images; made once per session (`made_once`). Train under `one_torch_thread`."""

    def make(work):
        from balatro_train.train import train

        labels_file = write_cards(work / "labelled")
        labels = json.loads(labels_file.read_text())
        known = labels_file.with_name("known.json")
        known.write_text(json.dumps({f: m for f, m in labels.items() if m["name"] != NEW_CARD}))
        train(
            compose([*tiny_overrides({"labels_file": known, "augmented": ""}, work / "labelled"), *COSINE]),
            work / "run",
        )
        for name, image in never_seen_cards().items():
            Image.fromarray(image).save(work / f"never_seen_{name}.png")

    return made_once(tmp_path_factory, "cosine_model", make)
