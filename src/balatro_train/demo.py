"""The built-in demo datasets: Balatro-like cards rendered deterministically, in the annotation tool's format.

`ensure_rendered(out_dir, ...)` renders on first use and reuses the files afterwards:
  {out_dir}/dataset_default/*.png + labels.json     screenshot-like crops of cards on green felt
  {out_dir}/augmented/*.png + augmented.json        offline augmentations (rotated RGBA), weighted to rare
                                                    classes; an empty augmented.json when there are none
  {out_dir}/render.json                             the settings it was rendered with
The settings are `dataset.render` in conf/dataset/demo.yaml (the default: the real collection's scale and
look, style collection) and demo_easy.yaml (style easy); demo_cards.py says what each style draws.
`python -m balatro_train.demo [--dataset demo_easy] --preview` renders a set and writes a contact sheet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image, ImageDraw
from tqdm import tqdm

from balatro_train.demo_cards import (
    EDITIONS,
    FRAME,
    STYLES,
    augment,
    card_sprite,
    catalogue,
    pick_cards,
    plan_collection,
    screenshot,
    shows_name,
)
from balatro_train.demo_conditions import Conditions, capture
from balatro_train.errors import UserError

__all__ = ["EDITIONS", "catalogue", "ensure_rendered", "write_contact_sheet", "main"]


def ensure_rendered(
    out_dir: str,
    num_cards: int = 48,
    samples_per_card: float = 40,
    augmented_per_card: int = 10,
    seed: int = 0,
    style: str = "easy",
    conditions: dict | None = None,
) -> str:
    """Render the set into `out_dir` unless it is there already; returns out_dir.

    The folder's name must carry every setting (the configs build it from them), so that a changed
    setting renders a new set; a folder whose render.json records other settings is refused rather
    than reused. Rendering goes to a temporary sibling folder that is renamed into place at the end,
    so a second process (a parallel sweep job) never sees half a set: it renders its own copy and
    the first rename wins.
    """
    settings = {
        "style": style,
        "num_cards": num_cards,
        "samples_per_card": samples_per_card,
        "augmented_per_card": augmented_per_card,
        "seed": seed,
    }
    if conditions is not None or style == "wild":  # the capture conditions, all of them, in render.json
        if style != "wild":
            raise UserError(f"dataset.render.conditions apply to style wild only, not {style}: remove them")
        settings["conditions"] = Conditions.from_settings(dict(conditions or {})).as_settings()
    check_settings(settings)
    target = Path(out_dir)
    if (target / "augmented" / "augmented.json").is_file():
        check_same_settings(target, settings)
        return out_dir
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        render(tmp, out_dir, settings)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: its set is identical
            if not (target / "augmented" / "augmented.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def check_settings(settings: dict) -> None:
    if settings["style"] not in STYLES:
        raise UserError(f"dataset.render.style={settings['style']} is not one of {', '.join(STYLES)}")
    if settings["samples_per_card"] < 1:
        raise UserError(f"dataset.render.samples_per_card={settings['samples_per_card']} must be at least 1")
    if settings["num_cards"] < 1 or settings["augmented_per_card"] < 0:
        raise UserError("dataset.render.num_cards must be at least 1 and dataset.render.augmented_per_card 0 or more")


def check_same_settings(target: Path, settings: dict) -> None:
    """A set rendered before render.json existed is reused as it is: nothing to compare with."""
    stamp = target / "render.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != json.loads(json.dumps(settings)):
        raise UserError(
            f"{target} holds a demo set rendered with other settings ({stamp.read_text().strip()}), "
            f"not {json.dumps(settings)}; name dataset.render.out_dir after every setting, "
            f"or delete the folder"
        )


def render(folder: Path, out_dir: str, settings: dict) -> None:
    style, seed = settings["style"], settings["seed"]
    rng = np.random.default_rng(seed)
    conditions = Conditions.from_settings(settings["conditions"]) if style == "wild" else None
    if style == "easy":  # editions are drawn per screenshot in the loop below
        cards = pick_cards(settings["num_cards"], rng)
        counts = rng.integers(1, round(2 * settings["samples_per_card"]), len(cards))  # 1 to 2x the mean
        planned = None
    else:
        plan = plan_collection(settings["num_cards"], settings["samples_per_card"], rng)
        cards, planned = [card for card, _ in plan], [editions for _, editions in plan]
        counts = [len(editions) for editions in planned]
    editions, weights = list(EDITIONS), np.array(list(EDITIONS.values()))
    (folder / "dataset_default").mkdir(parents=True)
    (folder / "augmented").mkdir()
    labels, augmented = {}, {}
    num_augmented = settings["augmented_per_card"] * len(cards)
    progress = tqdm(total=int(sum(counts)) + num_augmented, desc="rendering the demo set", disable=None)
    sprites = [
        card_sprite(card, seed, shows_name(card[1], style), art_of)
        for card, art_of in zip(cards, look_alikes(cards, style), strict=True)
    ]
    for index, (card, count) in enumerate(zip(cards, counts, strict=True)):
        for k in range(int(count)):
            edition = planned[index][k] if planned is not None else editions[int(rng.choice(len(editions), p=weights))]
            file = f"card{index:03d}_s{k:02d}.png"
            if conditions is None:
                image = screenshot(sprites[index], edition, rng, style)
            else:
                neighbour = sprites[(index + 1 + int(rng.integers(0, len(cards) - 1))) % len(cards)]
                image = capture(sprites[index], edition, rng, conditions, neighbour, card[1] == "Joker")
            image.save(folder / "dataset_default" / file, compress_level=1)
            labels[file] = {
                "name": card[0],
                "type": card[1],
                "rarity": card[2],
                "modifier": edition,
                "full_path": f"{out_dir}/dataset_default/{file}",
            }
            progress.update()
    # Offline augmentations favour rare cards and rare editions, as users balance their sets.
    files = list(labels)
    card_count, edition_count = {}, {}
    for meta in labels.values():
        card_count[meta["name"]] = card_count.get(meta["name"], 0) + 1
        edition_count[meta["modifier"]] = edition_count.get(meta["modifier"], 0) + 1
    edition_share = EDITIONS if style == "easy" else edition_count
    rarity = np.array([1.0 / card_count[labels[f]["name"]] / edition_share[labels[f]["modifier"]] for f in files])
    parents = rng.choice(len(files), size=num_augmented, p=rarity / rarity.sum())
    for k, parent_index in enumerate(parents):
        parent = files[parent_index]
        image, how = augment(Image.open(folder / "dataset_default" / parent), rng)
        file = f"aug{k:04d}_{parent}"
        image.save(folder / "augmented" / file, compress_level=1)
        augmented[file] = {
            **labels[parent],
            "full_path": f"{out_dir}/augmented/{file}",
            "parent": parent,
            "augmentation": how,
        }
        progress.update()
    progress.close()
    (folder / "dataset_default" / "labels.json").write_text(json.dumps(labels, indent=1))
    (folder / "render.json").write_text(json.dumps(settings) + "\n")
    (folder / "augmented" / "augmented.json").write_text(json.dumps(augmented, indent=1))  # last: the set is whole


def look_alikes(cards: list[tuple[str, str, str]], style: str) -> list[str | None]:
    """Per card, the card whose art it shares (style wild: every fourth Joker looks like the Joker before it,
    one motif apart), or None."""
    jokers = [i for i, card in enumerate(cards) if card[1] == "Joker"]
    art_of: list[str | None] = [None] * len(cards)
    if style == "wild":
        for k in range(3, len(jokers), 4):
            art_of[jokers[k]] = cards[jokers[k - 1]][0]
    return art_of


def write_contact_sheet(out_dir: str, path: str, per_cell: int = 2) -> str:
    """A grid to look at before training: one row per edition, `per_cell` columns per card type.
    A column follows one card (of those seen in the most editions) down the rows, so that its
    editions can be compared; where it lacks one, another card of its type stands in."""
    labels = json.loads((Path(out_dir) / "dataset_default" / "labels.json").read_text())
    by_card: dict[str, dict[str, str]] = {}  # name -> edition -> its first screenshot
    for file, meta in labels.items():
        by_card.setdefault(meta["name"], {}).setdefault(meta["modifier"], file)
    kind = {meta["name"]: meta["type"] for meta in labels.values()}
    thumb = (97, 134)  # two thirds of a crop
    columns = []
    for card_type in FRAME:
        names = sorted((n for n in by_card if kind[n] == card_type), key=lambda n: -len(by_card[n]))
        columns += [(card_type, names[i] if i < len(names) else None) for i in range(per_cell)]
    sheet = Image.new("RGB", (90 + thumb[0] * len(columns), 20 + thumb[1] * len(EDITIONS)), (16, 16, 16))
    draw = ImageDraw.Draw(sheet)
    for c, (card_type, _) in enumerate(columns[::per_cell]):
        draw.text((90 + c * per_cell * thumb[0] + 4, 4), card_type, fill=(255, 255, 255))
    for r, edition in enumerate(EDITIONS):
        draw.text((4, 20 + r * thumb[1] + thumb[1] // 2), edition, fill=(255, 255, 255))
        shown = {name for _, name in columns}
        for c, (card_type, name) in enumerate(columns):
            if name is None or edition not in by_card[name]:
                stand_ins = [n for n in by_card if kind[n] == card_type and edition in by_card[n] and n not in shown]
                name = stand_ins[0] if stand_ins else None
                shown.add(name)
            if name is not None:
                image = Image.open(Path(out_dir) / "dataset_default" / by_card[name][edition]).resize(thumb)
                sheet.paste(image, (90 + c * thumb[0], 20 + r * thumb[1]))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def summary(labels: dict) -> dict:
    """A labels.json's statistics: cards per type, screenshots per card, cards and screenshots per edition."""
    per_card: dict[str, list[dict]] = {}
    for meta in labels.values():
        per_card.setdefault(meta["name"], []).append(meta)
    counts = np.array([len(shots) for shots in per_card.values()])
    types = [shots[0]["type"] for shots in per_card.values()]
    return {
        "cards": len(per_card),
        "cards_per_type": {t: types.count(t) for t in FRAME},
        "screenshots": len(labels),
        "per_card_min": int(counts.min()),
        "per_card_mean": float(counts.mean()),
        "per_card_max": int(counts.max()),
        "cards_seen_once": int((counts == 1).sum()),
        "cards_per_edition": {
            e: sum(any(m["modifier"] == e for m in shots) for shots in per_card.values()) for e in EDITIONS
        },
        "screenshots_per_edition": {e: sum(m["modifier"] == e for m in labels.values()) for e in EDITIONS},
    }


def preset(dataset: str) -> dict:
    """`dataset.render` of conf/dataset/<dataset>.yaml, as the training config has it."""
    from balatro_train.config import CONFIG_DIR

    file = Path(CONFIG_DIR) / "dataset" / f"{dataset}.yaml"
    if not file.is_file():
        raise UserError(f"{file}: no such dataset config")
    return OmegaConf.to_container(OmegaConf.load(file).dataset.render)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Render a demo dataset (and a contact sheet to look at) with the "
        "settings of a dataset config; options override them."
    )
    parser.add_argument("--dataset", default="demo", help="demo (the default, real-scale set), demo_wild or demo_easy")
    parser.add_argument("--style", choices=STYLES)
    parser.add_argument("--num-cards", type=int)
    parser.add_argument("--samples-per-card", type=float)
    parser.add_argument("--augmented-per-card", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out-dir", help="default: the folder the training config uses for these settings")
    parser.add_argument(
        "--preview",
        nargs="?",
        const="",
        metavar="PNG",
        help="also write a contact sheet (default: <out-dir>/contact_sheet.png)",
    )
    args = parser.parse_args(argv)
    render = OmegaConf.create(preset(args.dataset))
    for key in ("style", "num_cards", "samples_per_card", "augmented_per_card", "seed"):
        value = getattr(args, key)
        if value is not None:
            render[key] = int(value) if isinstance(value, float) and value.is_integer() else value
    if args.out_dir:
        render.out_dir = args.out_dir
    settings = {k: v for k, v in OmegaConf.to_container(render, resolve=True).items() if k != "_target_"}
    out_dir = ensure_rendered(**settings)
    stats = summary(json.loads((Path(out_dir) / "dataset_default" / "labels.json").read_text()))
    print(f"demo set: {out_dir}\n" + "\n".join(f"  {k}: {v}" for k, v in stats.items()))
    if args.preview is not None:
        print(f"contact sheet: {write_contact_sheet(out_dir, args.preview or f'{out_dir}/contact_sheet.png')}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
