"""The game's capture conditions over a demo card (`dataset.render.style=wild`, `dataset=demo_wild`).

What real Balatro screenshots have that the clean collection style lacks, each a key of
`dataset.render.conditions` (conf/dataset/demo_wild.yaml) so that a user can match their own captures:

  scale       the window: a 1080p crop is 145x200; 720p to 4K give 95x127 to 284x380 (drawn log-uniform)
  fill        how tightly the card fills its crop
  tilt        the sway: degrees of rotation, and a slight perspective shear (`shear`, a share of the size)
  hover       share of hovered cards: raised and scaled up, so the crop cuts them
  overlap     share of crops where the neighbouring card in hand lies over this one
  sticker     share of Jokers wearing a sticker (Eternal, Perishable, Rental) in a corner
  shop        share of crops on the shop's panel instead of the felt's animated swirl
  scanlines   share seen through the CRT filter's scanlines
  jpeg        share saved through lossy compression (4:2:0 JPEG at `jpeg_quality`), as streams and captures are

The card is pixel art upscaled with nearest-neighbour sampling to its size on screen, the edition's shader is
drawn in the card's own coordinates (so it scales with the window, as in the game), then the card is tilted
onto the crop. Every draw comes from the caller's generator: the same seed renders the same set.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np
from PIL import Image, ImageDraw

from balatro_train.demo_cards import CROP, FELT, FRAME, SPRITE, apply_edition
from balatro_train.errors import UserError

SHOP_PANEL = np.array([62, 52, 66], dtype=np.float32)
STICKERS = {"Eternal": (150, 90, 200), "Perishable": (80, 170, 160), "Rental": (220, 180, 60)}
REFERENCE_CARD_WIDTH = 2 * SPRITE[0]  # a card's width on screen in a 1080p crop, where the clean style draws it


@dataclass(frozen=True)
class Conditions:
    scale: tuple[float, float] = (0.66, 1.96)
    fill: tuple[float, float] = (0.86, 1.0)
    tilt: float = 4.0
    shear: float = 0.03
    hover: float = 0.15
    overlap: float = 0.3
    sticker: float = 0.15
    shop: float = 0.3
    scanlines: float = 0.3
    jpeg: float = 0.5
    jpeg_quality: tuple[int, int] = (35, 90)

    @classmethod
    def from_settings(cls, settings: dict) -> Conditions:
        """The render keys, checked: one line naming the key and what it may be."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise UserError(
                f"dataset.render.conditions.{unknown[0]}: no such condition; known: {', '.join(sorted(known))}"
            )
        values = {k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in settings.items()}
        conditions = cls(**values)
        for name in ("hover", "overlap", "sticker", "shop", "scanlines", "jpeg"):
            if not 0 <= getattr(conditions, name) <= 1:
                raise UserError(f"dataset.render.conditions.{name}={getattr(conditions, name)} is a share: 0 to 1")
        for name, low, high in (("scale", 0.25, 4), ("fill", 0.5, 1.2), ("jpeg_quality", 5, 100)):
            pair = getattr(conditions, name)
            if len(pair) != 2 or not low <= pair[0] <= pair[1] <= high:
                raise UserError(
                    f"dataset.render.conditions.{name}={list(pair)} must be [low, high] within {low}-{high}"
                )
        if not 0 <= conditions.tilt <= 30 or not 0 <= conditions.shear <= 0.2:
            raise UserError("dataset.render.conditions.tilt must be 0-30 degrees and .shear 0-0.2")
        return conditions

    def as_settings(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def capture(
    sprite: Image.Image,
    edition: str,
    rng: np.random.Generator,
    conditions: Conditions,
    neighbour: Image.Image,
    is_joker: bool,
) -> Image.Image:
    """One labelled crop of `sprite` in `edition` as the game shows it and a capture records it;
    `neighbour` is another card's sprite, the one that may overlap this one."""
    c = conditions
    scale = float(np.exp(rng.uniform(np.log(c.scale[0]), np.log(c.scale[1]))))
    cw, ch = round(CROP[0] * scale), round(CROP[1] * scale)
    width = REFERENCE_CARD_WIDTH * scale * rng.uniform(*c.fill)
    raised = 0.0
    if rng.random() < c.hover:
        width *= rng.uniform(1.06, 1.14)
        raised = rng.uniform(0.04, 0.1) * ch
    if is_joker and rng.random() < c.sticker:
        sprite = with_sticker(sprite, rng)
    canvas = background(cw, ch, scale, rng, c)
    centre = (cw / 2 + rng.uniform(-0.03, 0.03) * cw, ch / 2 + rng.uniform(-0.03, 0.03) * ch - raised)
    card = card_pixels(sprite, edition, width, rng)
    canvas = place(canvas, card, centre, rng.uniform(-c.tilt, c.tilt), c.shear, rng)
    if rng.random() < c.overlap:  # the next card in hand lies over this one's left or right side
        side = 1 if rng.random() < 0.5 else -1
        shown = rng.uniform(0.1, 0.3) * cw  # how far into the crop it reaches
        other = card_pixels(neighbour, "Base", width, rng)
        x = cw / 2 + side * (cw / 2 + other.shape[1] / 2 - shown)
        canvas = place(canvas, other, (x, ch / 2 + rng.uniform(-0.05, 0.05) * ch), rng.uniform(-c.tilt, c.tilt), 0, rng)
    canvas = canvas * rng.uniform(0.85, 1.15) + rng.uniform(-12, 12)
    if rng.random() < c.scanlines:  # the CRT filter: every other line of the screen, darker
        period = max(2, round(2 * scale))
        rows = (np.arange(ch) % period) < period // 2
        canvas[rows] *= rng.uniform(0.8, 0.92)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    if rng.random() < c.jpeg:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(c.jpeg_quality[0], c.jpeg_quality[1] + 1)))
        image = Image.open(buffer).convert("RGB")
    return image


def card_pixels(sprite: Image.Image, edition: str, width: float, rng: np.random.Generator) -> np.ndarray:
    """The sprite upscaled (nearest: pixel art stays blocky) to `width` on screen, with the edition's
    shader drawn in the card's coordinates."""
    size = (max(8, round(width)), max(8, round(width * SPRITE[1] / SPRITE[0])))
    pixels = np.asarray(sprite.resize(size, Image.Resampling.NEAREST), np.float32)
    return apply_edition(pixels, edition, rng, "collection", unit=size[0] / REFERENCE_CARD_WIDTH)


def place(
    canvas: np.ndarray, card: np.ndarray, centre: tuple[float, float], degrees: float, shear: float, rng
) -> np.ndarray:
    """`card` drawn over `canvas` centred at `centre`, rotated by `degrees` and its corners moved by up to
    `shear` of its size (a slight perspective), with smooth edges."""
    h, w = card.shape[:2]
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = (corners - [w / 2, h / 2]) @ rotation.T + centre + rng.uniform(-shear, shear, (4, 2)) * [w, h]
    matrix = cv2.getPerspectiveTransform(corners, np.float32(moved))
    size = (canvas.shape[1], canvas.shape[0])
    warped = cv2.warpPerspective(card, matrix, size, flags=cv2.INTER_LINEAR)
    cover = cv2.warpPerspective(np.ones((h, w), np.float32), matrix, size, flags=cv2.INTER_LINEAR)[..., None]
    return canvas * (1 - cover) + warped * cover


def background(width: int, height: int, scale: float, rng: np.random.Generator, c: Conditions) -> np.ndarray:
    """The felt's slow swirl, or the shop's panel, with sensor-like noise, plus the edges of the cards beside."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / scale
    if rng.random() < c.shop:
        canvas = SHOP_PANEL + np.zeros((height, width, 1), np.float32)
    else:
        phase = rng.uniform(0, 2 * np.pi, 2)
        swirl = np.sin(x / 37 + 1.5 * np.sin(y / 53 + phase[0]) + phase[1])
        canvas = FELT + 14 * swirl[..., None] * np.array([0.3, 1.0, 0.7], np.float32)
    canvas = canvas + rng.normal(0, 5, (height, width, 3)).astype(np.float32)
    for side in (0, 1):  # the frames of the cards beside, at the crop's edges
        if rng.random() < 0.5:
            edge = max(2, round(rng.integers(3, 10) * scale))
            columns = slice(0, edge) if side == 0 else slice(width - edge, width)
            canvas[int(rng.integers(0, 30 * scale)) :, columns] = FRAME[list(FRAME)[int(rng.integers(0, 4))]]
    return canvas


def with_sticker(sprite: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A sticker's badge in the sprite's top-right corner, in sprite pixels (so it is pixel art too)."""
    sprite = sprite.copy()
    colour = list(STICKERS.values())[int(rng.integers(0, len(STICKERS)))]
    w = SPRITE[0]
    ImageDraw.Draw(sprite).rectangle([w - 17, 3, w - 4, 16], fill=colour, outline=(30, 30, 30))
    return sprite
