"""dataset=demo_wild: the collection's cards and editions through the game's capture conditions. The
conditions change pixels, never labels; every condition is a render key, checked, and part of the folder's name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import compose
from hydra.utils import instantiate
from PIL import Image

from balatro_train.demo import ensure_rendered, look_alikes
from balatro_train.demo_cards import card_sprite, catalogue
from balatro_train.demo_conditions import Conditions
from balatro_train.errors import UserError

TINY_WILD = dict(style="wild", num_cards=12, samples_per_card=4, augmented_per_card=0, seed=0)
CLEAN = dict(tilt=0, shear=0, hover=0, overlap=0, sticker=0, shop=0, scanlines=0, jpeg=0, scale=[1, 1], fill=[1, 1])


def labels_of(out_dir: str) -> dict:
    labels = json.loads((Path(out_dir) / "dataset_default" / "labels.json").read_text())
    return {file: (meta["name"], meta["modifier"]) for file, meta in labels.items()}


def sizes(out_dir: str) -> set[tuple[int, int]]:
    return {Image.open(path).size for path in (Path(out_dir) / "dataset_default").glob("*.png")}


def test_the_conditions_change_the_pixels_and_never_the_labels(tmp_path):
    """The same seed plans the same cards and editions in the collection and wild styles, file by file."""
    collection = ensure_rendered(str(tmp_path / "collection"), **{**TINY_WILD, "style": "collection"})
    wild = ensure_rendered(str(tmp_path / "wild"), **TINY_WILD)
    assert labels_of(wild) == labels_of(collection)
    assert sizes(collection) == {(145, 200)}
    widths = {w for w, _ in sizes(wild)}
    assert len(widths) > 5 and min(widths) >= 95 and max(widths) <= 285  # 720p to 4K windows
    rendered = json.loads((Path(wild) / "render.json").read_text())
    assert rendered["conditions"] == Conditions().as_settings()  # every condition recorded, defaults too


def test_the_preset_renders_through_hydra(tmp_path, monkeypatch):
    """As a run renders it: instantiate on the composed dataset.render (its lists arrive as ListConfig)."""
    monkeypatch.chdir(tmp_path)
    tiny = [f"dataset.render.{k}={v}" for k, v in TINY_WILD.items() if k != "style"]
    cfg = compose(["dataset=demo_wild", *tiny, "dataset.render.conditions.scale=[0.7,1.5]"])
    out_dir = Path(instantiate(cfg.dataset.render))
    assert out_dir == Path(cfg.dataset.render.out_dir) and "_res0.7-1.5_" in out_dir.name
    assert json.loads((out_dir / "render.json").read_text())["conditions"]["scale"] == [0.7, 1.5]
    assert labels_of(str(out_dir)) and max(w for w, _ in sizes(str(out_dir))) <= round(145 * 1.5)


def test_a_wild_set_is_deterministic(tmp_path):
    a = ensure_rendered(str(tmp_path / "a"), **TINY_WILD, conditions={"jpeg": 1.0})
    b = ensure_rendered(str(tmp_path / "b"), **TINY_WILD, conditions={"jpeg": 1.0})
    for file in labels_of(a):
        assert np.array_equal(
            np.asarray(Image.open(f"{a}/dataset_default/{file}")), np.asarray(Image.open(f"{b}/dataset_default/{file}"))
        )


def test_each_condition_can_be_turned_off(tmp_path):
    """With every condition off, a wild crop is the clean 1080p one: the knobs do what they say."""
    out = ensure_rendered(str(tmp_path / "clean"), **TINY_WILD, conditions=CLEAN)
    assert sizes(out) == {(145, 200)}
    jpeg_only = ensure_rendered(str(tmp_path / "jpeg"), **TINY_WILD, conditions={**CLEAN, "jpeg": 1.0})
    file = next(iter(labels_of(out)))
    clean, compressed = (np.asarray(Image.open(f"{d}/dataset_default/{file}"), np.float32) for d in (out, jpeg_only))
    assert 0.5 < np.abs(clean - compressed).mean() < 10  # the same picture, through JPEG


@pytest.mark.parametrize(
    "conditions, message",
    [
        ({"blur": 0.5}, "conditions.blur: no such condition"),
        ({"jpeg": 1.5}, "conditions.jpeg=1.5 is a share: 0 to 1"),
        ({"scale": [2, 1]}, r"conditions.scale=\[2, 1\] must be \[low, high\]"),
        ({"tilt": 90}, "tilt must be 0-30 degrees"),
    ],
)
def test_an_impossible_condition_is_refused_in_one_line(tmp_path, conditions, message):
    with pytest.raises(UserError, match=message):
        ensure_rendered(str(tmp_path / "set"), **TINY_WILD, conditions=conditions)
    assert not (tmp_path / "set").exists()


def test_conditions_on_a_clean_style_are_refused(tmp_path):
    with pytest.raises(UserError, match="conditions apply to style wild only, not collection"):
        ensure_rendered(str(tmp_path / "set"), **{**TINY_WILD, "style": "collection"}, conditions={"jpeg": 1})


def test_every_condition_is_part_of_the_folder_name():
    render = compose(["dataset=demo_wild"]).dataset.render
    assert set(render.conditions) == set(Conditions().as_settings())
    changed = {"scale": "[0.5,1.5]", "fill": "[0.9,1.0]", "jpeg_quality": "[20,60]"}
    folders = {render.out_dir}
    for key, value in render.conditions.items():
        new = changed[key] if key in changed else str(value + 0.01 if isinstance(value, float) else value + 1)
        folders.add(compose(["dataset=demo_wild", f"dataset.render.conditions.{key}={new}"]).dataset.render.out_dir)
    assert len(folders) == 1 + len(render.conditions)


def test_look_alike_jokers_differ_by_one_small_motif():
    jokers = [c for c in catalogue() if c[1] == "Joker"][:8]
    art_of = look_alikes(jokers, "wild")
    assert art_of == [None, None, None, jokers[2][0], None, None, None, jokers[6][0]]
    assert look_alikes(jokers, "collection") == [None] * 8
    original = np.asarray(card_sprite(jokers[2], 0, named=False))
    twin = np.asarray(card_sprite(jokers[3], 0, named=False, art_of=jokers[2][0]))
    differing = (original != twin).any(-1).sum()
    assert 20 < differing < 120  # an 8-pixel motif on a 71x95 sprite: the rest is the other card's art
    assert (np.asarray(card_sprite(jokers[3], 0, named=False)) != original).any(-1).sum() > 1000  # not a twin
