"""The demo's cards and screenshots: which cards and editions a set holds, and what they look like.

Two styles (`dataset.render.style`):
  easy        every card has its name in a banner, editions are loud repaints drawn per screenshot
              (50 / 16 / 14 / 12 / 8 %), screenshots per card uniform from 1 to twice the mean;
  collection  the real labelled collection's shape: its mix of types (133 Jokers, 22 Tarot, 10 Planet,
              16 Spectral of 181 cards), a skewed number of screenshots per card (1 to twice the mean,
              about a tenth seen once), each edition seen on the share of cards it is seen on there,
              Jokers without a printed name (only Tarot, Planet and Spectral cards show theirs), and
              Foil / Holographic as faint effects over the card's own colours;
  wild        the collection's cards and editions (a quarter of the Jokers look-alikes of another, one motif
              apart) through the game's capture conditions (demo_conditions.py): window sizes from 720p to
              4K, tilt, hover, overlapping neighbours, stickers, the shop's panel, scanlines, JPEG.
`demo.py` renders the files; this module only draws.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

STYLES = ("easy", "collection", "wild")
EDITIONS = {"Base": 0.50, "Foil": 0.16, "Holographic": 0.14, "Polychrome": 0.12, "Negative": 0.08}  # easy
TAROTS = [
    "The Fool",
    "The Magician",
    "The High Priestess",
    "The Empress",
    "The Emperor",
    "The Hierophant",
    "The Lovers",
    "The Chariot",
    "Justice",
    "The Hermit",
    "The Wheel of Fortune",
    "Strength",
    "The Hanged Man",
    "Death",
    "Temperance",
    "The Devil",
    "The Tower",
    "The Star",
    "The Moon",
    "The Sun",
    "Judgement",
    "The World",
]
PLANETS = [
    "Mercury",
    "Venus",
    "Earth",
    "Mars",
    "Jupiter",
    "Saturn",
    "Uranus",
    "Neptune",
    "Pluto",
    "Planet X",
    "Ceres",
    "Eris",
]
SPECTRALS = [
    "Familiar",
    "Grim",
    "Incantation",
    "Talisman",
    "Aura",
    "Wraith",
    "Sigil",
    "Ouija",
    "Ectoplasm",
    "Immolate",
    "Ankh",
    "Deja Vu",
    "Hex",
    "Trance",
    "Medium",
    "Cryptid",
    "The Soul",
    "Black Hole",
]
FRAME = {"Joker": (214, 160, 60), "Tarot": (160, 100, 200), "Planet": (70, 175, 200), "Spectral": (60, 90, 210)}
SPRITE = (71, 95)  # the game's card sprite, in pixels
BANNER = (4, SPRITE[1] - 22, SPRITE[0] - 5, SPRITE[1] - 6)  # the name banner's box on the sprite
BANNER_COLOUR = (245, 240, 225)
CROP = (145, 200)  # a screenshot crop around one card
FELT = np.array([28, 70, 48], dtype=np.float32)

# The real collection: cards per type, and cards seen at least once in each edition (of 181).
COLLECTION_TYPES = {"Joker": 133, "Tarot": 22, "Planet": 10, "Spectral": 16}
COLLECTION_EDITION_CARDS = {"Base": 177, "Foil": 90, "Holographic": 43, "Polychrome": 58, "Negative": 39}
# Per card, the chance that each edition is among those it is seen in. A card seen n times shows at most
# n editions (Base kept first), which loses some of the rarer ones: these are calibrated (by simulation,
# at 7.7 screenshots per card) so that the shares of cards per edition come out near the real ones.
EDITION_CHANCE = {"Base": 0.975, "Foil": 0.575, "Holographic": 0.275, "Polychrome": 0.375, "Negative": 0.25}
BASE_WEIGHT = 2.0  # a card's screenshots beyond one per edition it is seen in: Base twice as likely as another


def catalogue() -> list[tuple[str, str, str]]:
    """(name, type, rarity) of the 202 cards: 150 Jokers, 22 Tarot, 12 Planet, 18 Spectral."""
    rarities = ["Common"] * 90 + ["Uncommon"] * 43 + ["Rare"] * 12 + ["Legendary"] * 5
    cards = [(f"Joker_{i + 1:03d}", "Joker", rarities[(i * 37) % 150]) for i in range(150)]
    cards += [(n, "Tarot", "Consumable") for n in TAROTS] + [(n, "Planet", "Consumable") for n in PLANETS]
    return cards + [(n, "Spectral", "Consumable") for n in SPECTRALS]


def pick_cards(num_cards: int, rng: np.random.Generator, style: str = "easy") -> list[tuple[str, str, str]]:
    """A subset stratified by type (each type at least two cards), in catalogue order: in the
    catalogue's proportions (easy) or the real collection's (collection)."""
    cards = catalogue()
    num_cards = min(num_cards, len(cards))
    by_type = {t: [c for c in cards if c[1] == t] for t in FRAME}
    mix = {t: len(v) for t, v in by_type.items()} if style == "easy" else COLLECTION_TYPES
    quota = {t: min(len(by_type[t]), max(2, round(num_cards * n / sum(mix.values())))) for t, n in mix.items()}
    quota["Joker"] = max(2, num_cards - sum(q for t, q in quota.items() if t != "Joker"))
    chosen = []
    for t, members in by_type.items():
        picks = sorted(rng.choice(len(members), size=min(quota[t], len(members)), replace=False))
        chosen += [members[i] for i in picks]
    return chosen


def stratified(n: int, rng: np.random.Generator) -> np.ndarray:
    """n uniform draws in [0, 1), one in each of n equal slices, in random order: shares drawn with
    them come out close to their expectation even for a small set."""
    return ((np.arange(n) + rng.random(n)) / n)[rng.permutation(n)]


def skewed_counts(num_cards: int, mean: float, rng: np.random.Generator) -> np.ndarray:
    """Screenshots per card: a geometric draw (most cards seen a few times) capped at round(2 * mean),
    its rate set so that the mean is `mean`. At 7.7: 1 to 15, about 10% seen once, a fifth at the cap."""
    cap = max(1, round(2 * mean))
    lo, hi = 0.0, 1.0  # q, the chance of one more screenshot: the capped mean (1 - q^cap) / (1 - q) grows with it
    for _ in range(50):
        q = (lo + hi) / 2
        lo, hi = (q, hi) if (1 - q**cap) / (1 - q) < mean else (lo, q)
    cdf = np.minimum(np.cumsum([(1 - q) * q**k for k in range(cap)]), 1.0)
    cdf[-1] = 1.0
    return np.minimum(np.searchsorted(cdf, stratified(num_cards, rng)) + 1, cap)


def card_editions(count: int, draws: dict[str, float], rng: np.random.Generator) -> list[str]:
    """The editions of one card's `count` screenshots (collection style): the editions it is seen in
    (edition e where draws[e] < EDITION_CHANCE[e]), each at least once, the rest spread over them."""
    seen = [e for e in EDITION_CHANCE if draws[e] < EDITION_CHANCE[e]] or ["Base"]
    others = [e for e in seen if e != "Base"]
    kept = ([e for e in seen if e == "Base"] + [others[i] for i in rng.permutation(len(others))])[:count]
    weights = np.array([BASE_WEIGHT if e == "Base" else 1.0 for e in kept])
    extra = rng.choice(len(kept), size=count - len(kept), p=weights / weights.sum())
    editions = kept + [kept[i] for i in extra]
    return [editions[i] for i in rng.permutation(count)]


def plan_collection(
    num_cards: int, samples_per_card: float, rng: np.random.Generator
) -> list[tuple[tuple[str, str, str], list[str]]]:
    """The collection style's cards and the edition of each of their screenshots, before any pixel."""
    cards = pick_cards(num_cards, rng, "collection")
    counts = skewed_counts(len(cards), samples_per_card, rng)
    draws = {e: stratified(len(cards), rng) for e in EDITION_CHANCE}
    return [
        (card, card_editions(int(n), {e: d[i] for e, d in draws.items()}, rng))
        for i, (card, n) in enumerate(zip(cards, counts, strict=True))
    ]


def shows_name(card_type: str, style: str) -> bool:
    """In the game, Jokers carry no printed name; Tarot, Planet and Spectral cards show it at the bottom."""
    return style == "easy" or card_type != "Joker"


def card_sprite(card: tuple[str, str, str], seed: int, named: bool = True, art_of: str | None = None) -> Image.Image:
    """The card's own pixel art: a palette and shapes of its own, a type-coloured frame and, if
    `named`, a name banner at the bottom (the art is the same either way). With `art_of`, another
    card's name, it has that card's palette and shapes plus one small motif of its own: a look-alike,
    as many Jokers share a style and some pairs differ by one motif."""
    name, card_type, _ = card
    rng = np.random.default_rng([seed, *(art_of or name).encode()])
    w, h = SPRITE
    hues = rng.uniform(0, 1, 3)
    palette = [
        tuple(int(c) for c in hsv_to_rgb(np.array([hue, rng.uniform(0.5, 1), rng.uniform(0.55, 1)]))) for hue in hues
    ]
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
    if art_of is not None:
        own = np.random.default_rng([seed, *name.encode()])
        x0, y0 = int(own.integers(8, w - 18)), int(own.integers(10, h - 40))
        colour = tuple(int(c) for c in hsv_to_rgb(np.array([own.uniform(0, 1), 0.9, 0.9])))
        draw.ellipse([x0, y0, x0 + 8, y0 + 8], fill=colour, outline=(20, 20, 20))
    if named:
        draw.rectangle(list(BANNER), fill=BANNER_COLOUR)
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


def apply_edition(
    card: np.ndarray, edition: str, rng: np.random.Generator, style: str = "easy", unit: float = 1.0
) -> np.ndarray:
    """The edition's shader, over the whole card (float RGB 0..255, HxWx3). Patterns are coarse
    enough to survive downscaling to 64 px. In the collection style Foil and Holographic are faint
    and keep the card's own colours, as in the game; Polychrome and Negative are the same in both.
    `unit`: screen pixels per pixel of a 1080p card (the patterns scale with the card, as in the game)."""
    h, w, _ = card.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / unit
    w = w / unit
    phase = rng.uniform(0, 2 * np.pi)
    subtle = style == "collection"
    if edition == "Foil" and subtle:  # a faint cool tint and a soft diagonal sheen
        sheen = np.maximum(0, np.sin((x + y) / 12 + phase)) ** 2
        card = 0.9 * card + 0.1 * card.mean(-1, keepdims=True) * np.array([0.9, 1.0, 1.2])
        card = card + 40 * sheen[..., None] * np.array([0.85, 0.95, 1.0])
    elif edition == "Foil":  # cool blue-silver metal with diagonal light bands
        grey = card.mean(-1, keepdims=True)
        card = 0.35 * card + 0.65 * grey * np.array([0.8, 0.92, 1.25])
        card = card + 70 * np.sin((x + y) / 14 + phase)[..., None] * np.array([0.8, 0.9, 1.0])
    elif edition == "Holographic" and subtle:  # low-amplitude iridescent stripes at partial opacity
        angle = rng.uniform(0, np.pi)
        wave = (x * np.cos(angle) + y * np.sin(angle)) / 7 + phase
        card = card + 16 * np.sin(wave[..., None] + np.array([0, 2.1, 4.2]))
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


def screenshot(sprite: Image.Image, edition: str, rng: np.random.Generator, style: str = "easy") -> Image.Image:
    """One labelled crop: the card (scaled about 2x) on felt, offset, lit, with neighbours at the edges."""
    cw, ch = CROP
    scale = rng.uniform(1.85, 2.05)
    size = (int(SPRITE[0] * scale), int(SPRITE[1] * scale))
    card = apply_edition(np.asarray(sprite.resize(size, Image.Resampling.NEAREST), np.float32), edition, rng, style)
    canvas = FELT + rng.normal(0, 6, (ch, cw, 3)).astype(np.float32)
    for side in (0, 1):  # edges of neighbouring cards
        if rng.random() < 0.5:
            width = int(rng.integers(3, 10))
            colour = FRAME[list(FRAME)[int(rng.integers(0, 4))]]
            cols = slice(0, width) if side == 0 else slice(cw - width, cw)
            canvas[int(rng.integers(0, 30)) :, cols] = colour
    x0 = int((cw - size[0]) / 2 + rng.integers(-5, 6))
    y0 = int((ch - size[1]) / 2 + rng.integers(-6, 7))
    xs, ys = slice(max(0, x0), min(cw, x0 + size[0])), slice(max(0, y0), min(ch, y0 + size[1]))
    canvas[ys, xs] = card[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
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
