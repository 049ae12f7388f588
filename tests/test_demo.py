"""The demo dataset: the annotation tool's format, deterministic, atomic, and the runner's default."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
from PIL import Image

from balatro_train.demo import EDITIONS, catalogue, ensure_rendered, write_contact_sheet
from conftest import run_cli, run_dirs

TINY = dict(num_cards=8, samples_per_card=3, augmented_per_card=2, seed=0)


def load(out_dir: Path) -> tuple[dict, dict]:
    return (json.loads((out_dir / "dataset_default/labels.json").read_text()),
            json.loads((out_dir / "augmented/augmented.json").read_text()))


def test_catalogue_is_the_games_collection():
    types = [card_type for _, card_type, _ in catalogue()]
    assert {t: types.count(t) for t in set(types)} == {"Joker": 150, "Tarot": 22, "Planet": 12, "Spectral": 18}
    assert {rarity for _, t, rarity in catalogue() if t == "Joker"} == {"Common", "Uncommon", "Rare", "Legendary"}


def test_render_writes_the_annotation_tools_format(tmp_path):
    out_dir = str(tmp_path / "set")
    ensure_rendered(out_dir, **TINY)
    labels, augmented = load(Path(out_dir))
    assert len({m["name"] for m in labels.values()}) == 8
    assert {m["type"] for m in labels.values()} == {"Joker", "Tarot", "Planet", "Spectral"}
    assert {m["modifier"] for m in labels.values()} <= set(EDITIONS)
    for file, meta in labels.items():
        assert set(meta) == {"name", "type", "rarity", "modifier", "full_path"}
        assert meta["full_path"] == f"{out_dir}/dataset_default/{file}"
        assert Image.open(meta["full_path"]).mode == "RGB"
    assert len(augmented) == 2 * 8
    for file, meta in augmented.items():
        assert meta["parent"] in labels and meta["augmentation"]
        assert {k: v for k, v in meta.items() if k not in ("full_path", "parent", "augmentation")} == \
            {k: v for k, v in labels[meta["parent"]].items() if k != "full_path"}
        assert Image.open(meta["full_path"]).mode == "RGBA"


def test_render_is_deterministic_and_reused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ensure_rendered(str(a), **TINY)
    ensure_rendered(str(b), **TINY)
    (labels_a, aug_a), (labels_b, aug_b) = load(a), load(b)
    strip = lambda d: {f: {k: v for k, v in m.items() if k != "full_path"} for f, m in d.items()}  # noqa: E731
    assert strip(labels_a) == strip(labels_b) and strip(aug_a) == strip(aug_b)
    for file in list(labels_a)[:5]:
        assert np.array_equal(np.asarray(Image.open(a / "dataset_default" / file)),
                              np.asarray(Image.open(b / "dataset_default" / file)))
    stamp = (a / "dataset_default/labels.json").stat().st_mtime_ns
    ensure_rendered(str(a), **TINY)
    assert (a / "dataset_default/labels.json").stat().st_mtime_ns == stamp


def _render(out_dir: str) -> str:
    return ensure_rendered(out_dir, **TINY)


def test_two_processes_rendering_at_once_leave_one_complete_set(tmp_path):
    out_dir = str(tmp_path / "shared")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert pool.map(_render, [out_dir, out_dir]) == [out_dir, out_dir]
    labels, augmented = load(Path(out_dir))
    assert all(Path(m["full_path"]).is_file() for m in [*labels.values(), *augmented.values()])
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no temporary folder left behind


def test_contact_sheet(tmp_path):
    out_dir = str(tmp_path / "set")
    ensure_rendered(out_dir, **TINY)
    sheet = Image.open(write_contact_sheet(out_dir, str(tmp_path / "sheet.png")))
    assert sheet.width > 500 and sheet.height > 400


def test_the_default_dataset_trains_out_of_the_box(tmp_path):
    """`python -m balatro_train` with no dataset options renders the demo and trains on it."""
    run_cli(["dataset.render.num_cards=8", "dataset.render.samples_per_card=4", "data.image_size=32",
             "model.pretrained=false", "trainer.epochs=2", "trainer.batch_size=16"], cwd=tmp_path)
    [run] = run_dirs(tmp_path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"identification/top1_acc", "modifier/top1_acc"} <= set(rows[0])
    assert (tmp_path / "data/demo/cards8_x4_aug10_seed0/dataset_default/labels.json").is_file()
    assert (tmp_path / "data/models/best_model.pt").is_file()
