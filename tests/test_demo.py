"""The demo datasets: the annotation tool's format, deterministic, atomic, the runner's default, and the
collection style's shape (the real collection's types, screenshots per card, editions, unnamed Jokers)."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from conftest import compose, run_cli, run_dirs
from hydra.utils import instantiate
from PIL import Image

import balatro_train.demo as demo
from balatro_train.data import build_data
from balatro_train.demo import EDITIONS, catalogue, ensure_rendered, main, summary, write_contact_sheet
from balatro_train.demo_cards import BANNER, BANNER_COLOUR, apply_edition, card_sprite, plan_collection, shows_name
from balatro_train.errors import UserError
from balatro_train.labels import read_labels

TINY = dict(num_cards=8, samples_per_card=3, augmented_per_card=2, seed=0)
TINY_COLLECTION = dict(style="collection", num_cards=12, samples_per_card=4, augmented_per_card=0, seed=0)
REAL = {"Base": 177, "Foil": 90, "Holographic": 43, "Polychrome": 58, "Negative": 39}  # cards of 181


def load(out_dir: Path) -> tuple[dict, dict]:
    return (
        json.loads((out_dir / "dataset_default/labels.json").read_text()),
        json.loads((out_dir / "augmented/augmented.json").read_text()),
    )


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
    for meta in augmented.values():
        assert meta["parent"] in labels and meta["augmentation"]
        assert {k: v for k, v in meta.items() if k not in ("full_path", "parent", "augmentation")} == {
            k: v for k, v in labels[meta["parent"]].items() if k != "full_path"
        }
        assert Image.open(meta["full_path"]).mode == "RGBA"
    assert json.loads((Path(out_dir) / "render.json").read_text()) == {"style": "easy", **TINY}


@pytest.mark.parametrize("settings", [TINY, TINY_COLLECTION], ids=["easy", "collection"])
def test_render_is_deterministic_and_reused(tmp_path, settings):
    a, b = tmp_path / "a", tmp_path / "b"
    ensure_rendered(str(a), **settings)
    ensure_rendered(str(b), **settings)
    (labels_a, aug_a), (labels_b, aug_b) = load(a), load(b)
    strip = lambda d: {f: {k: v for k, v in m.items() if k != "full_path"} for f, m in d.items()}  # noqa: E731
    assert strip(labels_a) == strip(labels_b) and strip(aug_a) == strip(aug_b)
    for file in labels_a:
        assert np.array_equal(
            np.asarray(Image.open(a / "dataset_default" / file)), np.asarray(Image.open(b / "dataset_default" / file))
        )
    stamp = (a / "dataset_default/labels.json").stat().st_mtime_ns
    ensure_rendered(str(a), **settings)
    assert (a / "dataset_default/labels.json").stat().st_mtime_ns == stamp


def test_a_folder_rendered_with_other_settings_is_refused(tmp_path):
    out_dir = str(tmp_path / "set")
    ensure_rendered(out_dir, **TINY)
    with pytest.raises(UserError, match="other settings"):
        ensure_rendered(out_dir, **{**TINY, "seed": 1})


@pytest.mark.parametrize("dataset", ["demo", "demo_easy"])
def test_every_render_setting_is_part_of_the_folder_name(dataset):
    """A changed setting must render its own set, never reuse one rendered with the old value."""
    cfg = compose([f"dataset={dataset}"])
    render = cfg.dataset.render
    assert cfg.dataset.labels_file == f"{render.out_dir}/dataset_default/labels.json"
    assert list(cfg.dataset.augmented_labels_files) == [f"{render.out_dir}/augmented/augmented.json"]
    other = {
        "style": "easy" if render.style == "collection" else "collection",
        "num_cards": 20,
        "samples_per_card": 5,
        "augmented_per_card": 3,
        "seed": 7,
    }
    assert set(render) - {"_target_", "out_dir"} == set(other)
    folders = {render.out_dir}
    for key, value in other.items():
        folders.add(compose([f"dataset={dataset}", f"dataset.render.{key}={value}"]).dataset.render.out_dir)
    assert len(folders) == 1 + len(other)


def test_the_presets():
    """demo (the default): the real collection's scale, no augmentations; demo_easy: the easy set."""
    easy, real = demo.preset("demo_easy"), demo.preset("demo")
    assert {k: easy[k] for k in ("style", "num_cards", "samples_per_card", "augmented_per_card")} == {
        "style": "easy",
        "num_cards": 48,
        "samples_per_card": 40,
        "augmented_per_card": 10,
    }
    assert {k: real[k] for k in ("style", "num_cards", "samples_per_card", "augmented_per_card")} == {
        "style": "collection",
        "num_cards": 181,
        "samples_per_card": 7.7,
        "augmented_per_card": 0,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_collection_style_has_the_real_collections_shape(seed):
    """181 cards in the real collection's types, 1 to 15 screenshots (7.7 on average, about a tenth
    seen once), each edition on about the share of cards it has there; a model that ignores the
    edition scores at most 0.75 on the modifier head."""
    plan = plan_collection(181, 7.7, np.random.default_rng(seed))
    labels = {
        f"{i}_{k}": {"name": card[0], "type": card[1], "modifier": edition}
        for i, (card, editions) in enumerate(plan)
        for k, edition in enumerate(editions)
    }
    stats = summary(labels)
    assert stats["cards_per_type"] == {"Joker": 133, "Tarot": 22, "Planet": 10, "Spectral": 16}
    assert stats["per_card_min"] == 1 and stats["per_card_max"] == 15
    assert stats["per_card_mean"] == pytest.approx(7.7, abs=0.15)
    assert 0.07 <= stats["cards_seen_once"] / 181 <= 0.14
    for edition, real in REAL.items():
        assert stats["cards_per_edition"][edition] == pytest.approx(real, abs=max(4, 0.15 * real)), edition
    assert stats["screenshots_per_edition"]["Base"] / stats["screenshots"] <= 0.75


def test_the_rendered_collection_follows_its_plan_and_reads_without_augmentations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose(
        ["dataset=demo", *(f"dataset.render.{k}={v}" for k, v in TINY_COLLECTION.items()), "data.image_size=32"]
    )
    out_dir = Path(instantiate(cfg.dataset.render))
    labels, augmented = load(out_dir)
    assert augmented == {} and read_labels(cfg.dataset.augmented_labels_files[0], ".", augmented=True) == []
    plan = plan_collection(12, 4, np.random.default_rng(0))
    assert {f: (m["name"], m["modifier"]) for f, m in labels.items()} == {
        f"card{i:03d}_s{k:02d}.png": (card[0], edition)
        for i, (card, editions) in enumerate(plan)
        for k, edition in enumerate(editions)
    }
    data = build_data(cfg)
    assert len(data.train) + len(data.val) == len(labels)


def test_jokers_show_no_name_and_consumables_do(tmp_path, monkeypatch):
    joker, tarot = catalogue()[0], next(c for c in catalogue() if c[1] == "Tarot")
    assert not shows_name("Joker", "collection") and shows_name("Tarot", "collection")
    assert shows_name("Joker", "easy")
    named, bare = np.asarray(card_sprite(joker, 0, named=True)), np.asarray(card_sprite(joker, 0, named=False))
    x0, y0, x1, y1 = BANNER
    outside = np.ones(named.shape[:2], bool)
    outside[y0 : y1 + 1, x0 : x1 + 1] = False
    assert np.array_equal(named[outside], bare[outside])  # the same art: only the name differs
    is_banner = lambda sprite: (sprite == BANNER_COLOUR).all(-1).sum()  # noqa: E731
    assert is_banner(bare) == 0 and is_banner(named) > 500
    assert len(np.unique(bare[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3), axis=0)) == 1  # nothing written there
    # The renderer asks for a name on consumables only.
    asked = []
    original = demo.card_sprite
    monkeypatch.setattr(
        demo,
        "card_sprite",
        lambda card, seed, named, art_of=None: asked.append((card[1], named)) or original(card, seed, named, art_of),
    )
    ensure_rendered(str(tmp_path / "set"), **TINY_COLLECTION)
    assert {t for t, named in asked if named} == {"Tarot", "Planet", "Spectral"}
    assert {t for t, named in asked if not named} == {"Joker"}
    assert is_banner(np.asarray(card_sprite(tarot, 0, named=True))) > 0


def test_collection_foil_and_holographic_are_faint_and_keep_the_cards_colours():
    card = np.asarray(card_sprite(catalogue()[3], 0, named=False).resize((142, 190)), np.float32)
    for edition in ("Foil", "Holographic"):
        subtle = apply_edition(card, edition, np.random.default_rng(0), "collection")
        loud = apply_edition(card, edition, np.random.default_rng(0), "easy")
        change = np.abs(subtle - card).mean()
        assert 4 < change < 25 and np.abs(loud - card).mean() > 2 * change, edition  # visible, but faint
        same = lambda image: np.corrcoef(image.ravel(), card.ravel())[0, 1]  # noqa: E731
        assert same(subtle) > 0.9 and same(loud) < 0.8, edition  # the card's own colours, not a repaint
    for edition in ("Polychrome", "Negative"):  # the same in both styles
        assert np.array_equal(
            apply_edition(card, edition, np.random.default_rng(0), "collection"),
            apply_edition(card, edition, np.random.default_rng(0), "easy"),
        )


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


def test_the_command_renders_a_preset_with_a_contact_sheet(tmp_path, capsys):
    out_dir = tmp_path / "set"
    main(["--dataset", "demo", "--num-cards", "12", "--samples-per-card", "4", "--out-dir", str(out_dir), "--preview"])
    assert (out_dir / "contact_sheet.png").is_file()
    assert json.loads((out_dir / "render.json").read_text()) == {**TINY_COLLECTION}
    assert "cards_per_type: {'Joker': 6, 'Tarot': 2, 'Planet': 2, 'Spectral': 2}" in capsys.readouterr().out


def test_the_default_dataset_trains_out_of_the_box(tmp_path):
    """`python -m balatro_train` with no dataset options renders the demo and trains on it."""
    run_cli(
        [
            "dataset.render.num_cards=12",
            "dataset.render.samples_per_card=4",
            "data.image_size=32",
            "model.pretrained=false",
            "trainer.epochs=2",
            "trainer.batch_size=16",
        ],
        cwd=tmp_path,
    )
    [run] = run_dirs(tmp_path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"identification/top1_acc", "modifier/top1_acc"} <= set(rows[0])
    assert (tmp_path / "data/demo/collection_cards12_x4_aug0_seed0/dataset_default/labels.json").is_file()
    assert (tmp_path / "data/models/best_model.pt").is_file()
