"""The built-in demo dataset: Balatro-like cards rendered deterministically, in the annotation tool's format.

`ensure_rendered(out_dir, ...)` renders on first use and reuses the files afterwards:
  {out_dir}/dataset_default/*.png + labels.json     screenshot-like crops of cards on green felt
  {out_dir}/augmented/*.png + augmented.json        offline augmentations (rotated RGBA), weighted to rare classes
`python -m balatro_train.demo --preview` renders the default set and writes a contact sheet to look at.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

EDITIONS = {"Base": 0.50, "Foil": 0.16, "Holographic": 0.14, "Polychrome": 0.12, "Negative": 0.08}
TAROTS = ["The Fool", "The Magician", "The High Priestess", "The Empress", "The Emperor", "The Hierophant",
          "The Lovers", "The Chariot", "Justice", "The Hermit", "The Wheel of Fortune", "Strength", "The Hanged Man",
          "Death", "Temperance", "The Devil", "The Tower", "The Star", "The Moon", "The Sun", "Judgement", "The World"]
PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune", "Pluto", "Planet X",
           "Ceres", "Eris"]
SPECTRALS = ["Familiar", "Grim", "Incantation", "Talisman", "Aura", "Wraith", "Sigil", "Ouija", "Ectoplasm",
             "Immolate", "Ankh", "Deja Vu", "Hex", "Trance", "Medium", "Cryptid", "The Soul", "Black Hole"]
FRAME = {"Joker": (214, 160, 60), "Tarot": (160, 100, 200), "Planet": (70, 175, 200), "Spectral": (60, 90, 210)}
SPRITE = (71, 95)           # the game's card sprite, in pixels
CROP = (145, 200)           # a screenshot crop around one card
FELT = np.array([28, 70, 48], dtype=np.float32)


def catalogue() -> list[tuple[str, str, str]]:
    """(name, type, rarity) of the 202 cards: 150 Jokers, 22 Tarot, 12 Planet, 18 Spectral."""
    rarities = ["Common"] * 90 + ["Uncommon"] * 43 + ["Rare"] * 12 + ["Legendary"] * 5
    cards = [(f"Joker_{i + 1:03d}", "Joker", rarities[(i * 37) % 150]) for i in range(150)]
    cards += [(n, "Tarot", "Consumable") for n in TAROTS] + [(n, "Planet", "Consumable") for n in PLANETS]
    return cards + [(n, "Spectral", "Consumable") for n in SPECTRALS]


def pick_cards(num_cards: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """A subset stratified by type (each type at least two cards), in catalogue order."""
    cards = catalogue()
    num_cards = min(num_cards, len(cards))
    by_type = {t: [c for c in cards if c[1] == t] for t in FRAME}
    quota = {t: max(2, round(num_cards * len(v) / len(cards))) for t, v in by_type.items()}
    quota["Joker"] = max(2, num_cards - sum(q for t, q in quota.items() if t != "Joker"))
    chosen = []
    for t, members in by_type.items():
        picks = sorted(rng.choice(len(members), size=min(quota[t], len(members)), replace=False))
        chosen += [members[i] for i in picks]
    return chosen


def card_sprite(card: tuple[str, str, str], seed: int) -> Image.Image:
    """The card's own pixel art: a palette and shapes of its own, a type-coloured frame, a name banner."""
    name, card_type, _ = card
    rng = np.random.default_rng([seed, *name.encode()])
    w, h = SPRITE
    hues = rng.uniform(0, 1, 3)
    palette = [tuple(int(c) for c in hsv_to_rgb(np.array([hue, rng.uniform(0.5, 1), rng.uniform(0.55, 1)]))) for
               hue in hues]
    background = tuple(int(c) for c in hsv_to_rgb(np.array([rng.uniform(0, 1), 0.25, 0.9])))
    sprite = Image.new("RGB", SPRITE, FRAME[card_type])
    draw = ImageDraw.Draw(sprite)
    draw.rectangle([4, 4, w - 5, h - 5], fill=background)
    for k in range(int(rng.integers(3, 6))):
        x0, y0 = rng.integers(6, w - 24), rng.integers(8, h - 40)
        x1, y1 = x0 + rng.integers(12, 28), y0 + rng.integers(12, 30)
        box = [int(x0), int(y0), int(min(x1, w - 6)), int(min(y1, h - 26))]
        kind = int(rng.integers(0, 4))
        colour = palette[k % 3]
        if kind == 0:
            draw.ellipse(box, fill=colour, outline=(20, 20, 20))
        elif kind == 1:
            draw.rectangle(box, fill=colour, outline=(20, 20, 20))
        elif kind == 2:
            draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=colour)
        else:
            draw.line([(box[0], box[1]), (box[2], box[3])], fill=colour, width=4)
    draw.rectangle([4, h - 22, w - 5, h - 6], fill=(245, 240, 225))
    draw.text((6, h - 20), name[:11], fill=(30, 30, 30), font=ImageFont.load_default())
    return sprite


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Vectorised HSV (0..1, last axis) to RGB (0..255)."""
    h, s, v = hsv[..., 0] % 1.0, hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    rgb = np.choose(i[..., None], choices)
    return rgb * 255


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn + 1e-6
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    h = np.where(mx == r, (g - b) / delta % 6, np.where(mx == g, (b - r) / delta + 2, (r - g) / delta + 4)) / 6
    return np.stack([h, np.where(mx > 0, (mx - mn) / (mx + 1e-6), 0), mx], -1)


def apply_edition(card: np.ndarray, edition: str, rng: np.random.Generator) -> np.ndarray:
    """The edition's shader, over the whole card (float RGB 0..255, HxWx3). Patterns are coarse
    enough to survive downscaling to 64 px."""
    h, w, _ = card.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if edition == "Foil":  # cool blue-silver metal with diagonal light bands
        grey = card.mean(-1, keepdims=True)
        card = 0.35 * card + 0.65 * grey * np.array([0.8, 0.92, 1.25])
        card = card + 70 * np.sin((x + y) / 14 + phase)[..., None] * np.array([0.8, 0.9, 1.0])
    elif edition == "Holographic":  # red/green/blue interference stripes
        angle = rng.uniform(0, np.pi)
        wave = (x * np.cos(angle) + y * np.sin(angle)) / 9 + phase
        stripes = 127 + 127 * np.sin(wave[..., None] + np.array([0, 2.1, 4.2]))
        card = 0.5 * card + 0.5 * stripes
    elif edition == "Polychrome":  # saturated rainbow hue shift sweeping across the card
        hsv = rgb_to_hsv(card)
        hsv[..., 0] += (x + 0.5 * y) / w * 0.8 + phase / (2 * np.pi)
        hsv[..., 1] = np.clip(hsv[..., 1] * 1.6 + 0.35, 0, 1)
        hsv[..., 2] = np.clip(hsv[..., 2] * 1.1, 0, 1)
        card = hsv_to_rgb(hsv)
    elif edition == "Negative":  # inverted, dark
        card = (255 - card) * 0.7 + np.array([20, 0, 30])
    return np.clip(card, 0, 255)


def screenshot(sprite: Image.Image, edition: str, rng: np.random.Generator) -> Image.Image:
    """One labelled crop: the card (scaled about 2x) on felt, offset, lit, with neighbours at the edges."""
    cw, ch = CROP
    scale = rng.uniform(1.85, 2.05)
    size = (int(SPRITE[0] * scale), int(SPRITE[1] * scale))
    card = apply_edition(np.asarray(sprite.resize(size, Image.Resampling.NEAREST), np.float32), edition, rng)
    canvas = FELT + rng.normal(0, 6, (ch, cw, 3)).astype(np.float32)
    for side in (0, 1):  # edges of neighbouring cards
        if rng.random() < 0.5:
            width = int(rng.integers(3, 10))
            colour = FRAME[list(FRAME)[int(rng.integers(0, 4))]]
            cols = slice(0, width) if side == 0 else slice(cw - width, cw)
            canvas[int(rng.integers(0, 30)):, cols] = colour
    x0 = int((cw - size[0]) / 2 + rng.integers(-5, 6))
    y0 = int((ch - size[1]) / 2 + rng.integers(-6, 7))
    xs, ys = slice(max(0, x0), min(cw, x0 + size[0])), slice(max(0, y0), min(ch, y0 + size[1]))
    canvas[ys, xs] = card[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0]
    canvas = canvas * rng.uniform(0.85, 1.15) + rng.uniform(-12, 12)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def augment(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """What users' offline augmentation tool does: rotate with transparent corners, change the light."""
    angle = float(rng.choice([-1, 1]) * rng.uniform(4, 18))
    rotated = image.convert("RGBA").rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    gain = rng.uniform(0.85, 1.15)
    rgba = np.asarray(rotated).astype(np.float32)
    rgba[..., :3] *= gain
    return Image.fromarray(np.clip(rgba, 0, 255).astype(np.uint8)), f"rotate_{angle:+.0f}_light_{gain:.2f}"


def ensure_rendered(out_dir: str, num_cards: int = 48, samples_per_card: int = 40, augmented_per_card: int = 10,
                    seed: int = 0) -> str:
    """Render the set into `out_dir` unless it is there already; returns out_dir.

    Rendering goes to a temporary sibling folder that is renamed into place at the end, so a
    second process (a parallel sweep job) never sees half a set: it renders its own copy and
    the first rename wins.
    """
    target = Path(out_dir)
    if (target / "augmented" / "augmented.json").is_file():
        return out_dir
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        render(tmp, out_dir, num_cards, samples_per_card, augmented_per_card, seed)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: its set is identical
            if not (target / "augmented" / "augmented.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def render(folder: Path, out_dir: str, num_cards: int, samples_per_card: int, augmented_per_card: int,
           seed: int) -> None:
    rng = np.random.default_rng(seed)
    cards = pick_cards(num_cards, rng)
    counts = rng.integers(1, 2 * samples_per_card, len(cards))  # imbalanced: some once, some 2x the mean
    editions, weights = list(EDITIONS), np.array(list(EDITIONS.values()))
    (folder / "dataset_default").mkdir(parents=True)
    (folder / "augmented").mkdir()
    labels, augmented = {}, {}
    progress = tqdm(total=int(counts.sum()) + augmented_per_card * len(cards), desc="rendering the demo set",
                    disable=None)
    for index, (card, count) in enumerate(zip(cards, counts)):
        sprite = card_sprite(card, seed)
        for k in range(int(count)):
            edition = editions[int(rng.choice(len(editions), p=weights))]
            file = f"card{index:03d}_s{k:02d}.png"
            screenshot(sprite, edition, rng).save(folder / "dataset_default" / file, compress_level=1)
            labels[file] = {"name": card[0], "type": card[1], "rarity": card[2], "modifier": edition,
                            "full_path": f"{out_dir}/dataset_default/{file}"}
            progress.update()
    # Offline augmentations favour rare cards and rare editions, as users balance their sets.
    files = list(labels)
    card_count = {}
    for meta in labels.values():
        card_count[meta["name"]] = card_count.get(meta["name"], 0) + 1
    rarity = np.array([1.0 / card_count[labels[f]["name"]] / EDITIONS[labels[f]["modifier"]] for f in files])
    parents = rng.choice(len(files), size=augmented_per_card * len(cards), p=rarity / rarity.sum())
    for k, parent_index in enumerate(parents):
        parent = files[parent_index]
        image, how = augment(Image.open(folder / "dataset_default" / parent), rng)
        file = f"aug{k:04d}_{parent}"
        image.save(folder / "augmented" / file, compress_level=1)
        augmented[file] = {**labels[parent], "full_path": f"{out_dir}/augmented/{file}", "parent": parent,
                           "augmentation": how}
        progress.update()
    progress.close()
    (folder / "dataset_default" / "labels.json").write_text(json.dumps(labels, indent=1))
    (folder / "augmented" / "augmented.json").write_text(json.dumps(augmented, indent=1))


def write_contact_sheet(out_dir: str, path: str, per_cell: int = 2) -> str:
    """A grid to look at before training: one row per edition, columns by card type."""
    labels = json.loads((Path(out_dir) / "dataset_default" / "labels.json").read_text())
    thumb = (73, 100)
    columns = [(t, i) for t in FRAME for i in range(per_cell)]
    sheet = Image.new("RGB", (90 + thumb[0] * len(columns), 20 + thumb[1] * len(EDITIONS)), (16, 16, 16))
    draw = ImageDraw.Draw(sheet)
    for c, (card_type, _) in enumerate(columns[::per_cell]):
        draw.text((90 + c * per_cell * thumb[0] + 4, 4), card_type, fill=(255, 255, 255))
    for r, edition in enumerate(EDITIONS):
        draw.text((4, 20 + r * thumb[1] + thumb[1] // 2), edition, fill=(255, 255, 255))
        for c, (card_type, i) in enumerate(columns):
            matches = [f for f, m in labels.items() if m["modifier"] == edition and m["type"] == card_type]
            if i < len(matches):
                image = Image.open(Path(out_dir) / "dataset_default" / matches[i]).resize(thumb)
                sheet.paste(image, (90 + c * thumb[0], 20 + r * thumb[1]))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render the demo dataset (and a contact sheet to look at).")
    parser.add_argument("--num-cards", type=int, default=48)
    parser.add_argument("--samples-per-card", type=int, default=40)
    parser.add_argument("--augmented-per-card", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", help="default: the folder the training config uses for these settings")
    parser.add_argument("--preview", nargs="?", const="", metavar="PNG",
                        help="also write a contact sheet (default: <out-dir>/contact_sheet.png)")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or (f"data/demo/cards{args.num_cards}_x{args.samples_per_card}"
                               f"_aug{args.augmented_per_card}_seed{args.seed}")
    ensure_rendered(out_dir, args.num_cards, args.samples_per_card, args.augmented_per_card, args.seed)
    print(f"demo set: {out_dir}")
    if args.preview is not None:
        print(f"contact sheet: {write_contact_sheet(out_dir, args.preview or f'{out_dir}/contact_sheet.png')}")


if __name__ == "__main__":
    main()
