"""What the labels files and the image files may hold, read as a user's own files would be: labels that
are no class name, a stale image beside the labels, encodings, repeated keys, 16-bit and rotated
photos, decompression bombs, the background colour. In-process: the functions called on real files."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import compose, tiny_overrides, write_dataset
from PIL import Image

from balatro_train.data import build_data
from balatro_train.errors import UserError
from balatro_train.labels import read_labels
from balatro_train.preprocessing import ImageTooLarge, Preprocessing, load_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def edit_labels(path: Path, edit) -> None:
    """Rewrite a labels file after `edit(file, meta)` has changed its entries in place."""
    labels = json.loads(path.read_text())
    for file, meta in labels.items():
        edit(file, meta)
    path.write_text(json.dumps(labels))


def edit_both(data: dict, edit) -> None:
    """The same edit to labels.json and augmented.json (augmented copies repeat their parent's labels)."""
    edit_labels(data["labels_file"], edit)
    edit_labels(data["augmented"], edit)


# ---- item 7: full_path and the image beside the labels ---------------------------------------------


def test_a_different_image_beside_the_labels_than_full_path_names_is_refused(tmp_path):
    """A second capture session whose tool reused the file names: with dataset.root at the first
    session, every full_path names the first session's image, and training silently took those."""
    first = write_dataset(tmp_path / "first", seed=0)
    second = write_dataset(tmp_path / "second", seed=1)  # the same file names, other pictures
    with pytest.raises(UserError) as error:
        read_labels(second["labels_file"], root=tmp_path / "first")
    message = str(error.value)
    stale = tmp_path / "first" / "dataset_default" / "Joker_001_0.png"
    beside = tmp_path / "second" / "dataset_default" / "Joker_001_0.png"
    assert "\n" not in message and "'Joker_001_0.png'" in message
    assert str(stale) in message and str(beside) in message and "dataset.root" in message

    assert all(
        s.path.parent == second["labels_file"].parent
        for s in read_labels(second["labels_file"], root=tmp_path / "second")
    )
    for image in (tmp_path / "first" / "dataset_default").glob("*.png"):  # byte-identical copies: no conflict
        shutil.copyfile(image, tmp_path / "second" / "dataset_default" / image.name)
    assert read_labels(second["labels_file"], root=tmp_path / "first")
    assert read_labels(first["labels_file"], root=tmp_path / "first")


# ---- item 8: labels that are no class name ----------------------------------------------------------


@pytest.mark.parametrize(
    "value, problem",
    [(None, "null"), ("", "empty"), ("  ", "empty"), (["Base"], "a list"), ({"kind": "Foil"}, "a JSON object")],
    ids=["null", "empty", "spaces", "list", "object"],
)
def test_a_label_that_is_no_class_name_is_refused_naming_entry_file_task_and_field(dataset, tiny_cfg, value, problem):
    data, root = dataset
    edit_labels(
        data["labels_file"], lambda file, meta: meta.update(modifier=value) if file == "Mercury_2.png" else None
    )
    with pytest.raises(UserError) as error:
        build_data(tiny_cfg())
    message = str(error.value)
    assert "\n" not in message and "'Mercury_2.png'" in message and str(data["labels_file"]) in message
    assert "'modifier'" in message and "task 'modifier'" in message and problem in message


def test_class_names_alike_but_for_case_or_spaces_are_warned_about_once_per_task(dataset, tiny_cfg, caplog):
    data, root = dataset
    respelled = {"Joker_001_1.png": "Joker_001 ", "Joker_001_2.png": "joker_001", "Mercury_1.png": "MERCURY"}
    edit_both(data, lambda file, meta: meta.update(name=respelled.get(meta.get("parent", file), meta["name"])))
    with caplog.at_level(logging.WARNING, logger="balatro_train"):
        build_data(tiny_cfg())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    [identification] = [w for w in warnings if "task identification" in w]
    assert "'Joker_001', 'Joker_001 ', 'joker_001'" in identification and "'MERCURY', 'Mercury'" in identification
    assert not [w for w in warnings if "task modifier" in w]


# ---- item 9: 16-bit grey and EXIF orientation --------------------------------------------------------


def test_a_16_bit_greyscale_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
    Image.fromarray(gradient).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as opened:
        assert opened.mode.startswith("I")  # what the test is about: Pillow keeps all 16 bits
    pixels = load_image(tmp_path / "grey16.png", 32, (0, 0, 0))
    expected = np.rint(gradient / 257).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])


@pytest.mark.parametrize(
    "orientation, upright",
    [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)],
    ids=["orientation 6", "orientation 8"],
)
def test_a_jpeg_is_turned_upright_by_its_exif_orientation(tmp_path, orientation, upright):
    """A phone stores its photo's pixels as the sensor saw them and says in EXIF how to turn them."""
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:20, :30] = (230, 30, 30)  # top left red, bottom right blue: every rotation looks different
    stored[20:, 30:] = (30, 30, 230)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    Image.fromarray(stored).save(tmp_path / "photo.jpg", quality=95, exif=exif)
    Image.fromarray(stored).transpose(upright).save(tmp_path / "by_hand.png")

    loaded = load_image(tmp_path / "photo.jpg", 32, (0, 0, 0)).astype(int)
    by_hand = load_image(tmp_path / "by_hand.png", 32, (0, 0, 0)).astype(int)
    assert np.abs(loaded - by_hand).mean() < 6  # JPEG's own losses only
    sideways = Preprocessing(32, (0, 0, 0), {}).square(Image.fromarray(stored)).astype(int)  # no EXIF: as stored
    assert np.abs(loaded - sideways).mean() > 40
    with Image.open(tmp_path / "photo.jpg") as opened:  # an opened PIL image goes the same way
        assert np.array_equal(Preprocessing(32, (0, 0, 0), {}).square(opened), loaded)


# ---- item 11: decompression bombs -------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: Pillow refuses it at open, from the header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_an_unreadable_image_naming_its_pixels_and_the_limit(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_claiming(30000, 30000))
    with pytest.raises(ValueError) as error:
        load_image(tmp_path / "bomb.png", 32, (0, 0, 0))
    assert isinstance(error.value, ImageTooLarge)
    assert f"({30000 * 30000} pixels) exceeds limit of {2 * Image.MAX_IMAGE_PIXELS} pixels" in str(error.value)


def test_a_decompression_bomb_in_the_dataset_stops_the_run_or_is_skipped(dataset, tiny_cfg):
    data, root = dataset
    bomb = root / "dataset_default" / "Mercury_0.png"
    bomb.write_bytes(png_claiming(30000, 30000))
    with pytest.raises(UserError) as error:
        build_data(tiny_cfg())
    assert str(bomb) in str(error.value) and "pixels) exceeds limit of" in str(error.value)
    assert "data.on_bad_image=skip" in str(error.value)

    built = build_data(tiny_cfg("data.on_bad_image=skip"))
    assert list(built.skipped) == ["Mercury_0.png"]
    assert "Mercury_0.png" not in built.split["train"] + built.split["val"]


# ---- item 12: numbers in the field the split stratifies by -----------------------------------------


def test_numbers_among_the_names_the_split_stratifies_by_are_class_names(dataset, tiny_cfg):
    data, root = dataset
    numbered = {"Joker_001": 1, "Joker_002": 2.5}  # beside the string names of the other cards
    edit_both(data, lambda file, meta: meta.update(name=numbered.get(meta["name"], meta["name"])))
    built = build_data(tiny_cfg())
    assert built.class_names["identification"] == ["1", "2.5", "Mercury", "The Fool"]
    assert {"1", "2.5"} <= set(built.train_labels)
    labels = json.loads(data["labels_file"].read_text())
    val_names = {str(labels[file]["name"]) for file in built.split["val"]}
    assert val_names == {"1", "2.5", "Mercury", "The Fool"}  # stratified: every card validates


# ---- item 13: a task with one class -----------------------------------------------------------------


def test_a_task_whose_labels_hold_one_class_is_refused_with_the_way_on(dataset, tiny_cfg):
    data, root = dataset
    edit_both(data, lambda file, meta: meta.update(modifier="Base"))
    with pytest.raises(UserError) as error:
        build_data(tiny_cfg())
    message = str(error.value)
    assert "\n" not in message and message.startswith("task modifier:")
    assert "modifier='Base'" in message and "task=identification" in message
    assert build_data(tiny_cfg("task=identification")).class_names == {
        "identification": ["Joker_001", "Joker_002", "Mercury", "The Fool"]
    }


# ---- item 14 and 18a: how the labels file is written ------------------------------------------------


def test_a_labels_file_that_is_not_utf8_names_the_byte_and_a_bom_is_fine(dataset):
    data, root = dataset
    path = data["labels_file"]
    text = path.read_text()
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # as Windows Notepad saves UTF-8
    assert len(read_labels(path, root)) == 16

    latin1 = text.replace('"Mercury"', '"Mercur\u00e9"', 1).encode("latin-1")
    path.write_bytes(latin1)
    with pytest.raises(UserError) as error:
        read_labels(path, root)
    offset = latin1.index("\u00e9".encode("latin-1"))
    assert str(error.value) == f"{path}: not UTF-8 text (byte {offset} is 0xe9); save it as UTF-8"


def test_a_key_repeated_inside_one_entry_is_called_that_not_an_image_listed_twice(dataset):
    data, root = dataset
    path = data["labels_file"]
    text = path.read_text()
    path.write_text(text.replace('"name": "Mercury"', '"name": "Mercury", "name": "The Fool"', 1))
    first_mercury = next(file for file, meta in json.loads(text).items() if meta["name"] == "Mercury")
    with pytest.raises(UserError) as error:
        read_labels(path, root)
    assert str(error.value) == f"{path}: entry {first_mercury!r} gives 'name' twice; keep one value per key"

    path.write_text(text.rstrip().removesuffix("}") + ', "Mercury_0.png": {"name": "Mercury"}}')
    with pytest.raises(UserError, match="'Mercury_0.png' is listed twice; keep one entry per image file"):
        read_labels(path, root)


# ---- data.background ---------------------------------------------------------------------------------


def test_transparent_pixels_come_out_in_the_configured_background_colour(tmp_path):
    root = tmp_path / "labelled"
    data = write_dataset(root)
    for image in (root / "dataset_default").glob("*.png"):  # the left half of every original transparent
        rgba = np.array(Image.open(image).convert("RGBA"))
        rgba[:, : rgba.shape[1] // 2, 3] = 0
        Image.fromarray(rgba).save(image)
    built = build_data(compose([*tiny_overrides(data, root), "data.background=[255,0,0]"]))
    originals = [i for i, f in enumerate(built.split["train"]) if not f.startswith("aug_")]
    for images in (built.val.images, built.train.images[originals]):
        assert np.all(images[:, :, :12] == (255, 0, 0))  # 32 px wide: columns 0-11 lie in the transparent half
        assert not np.any(np.all(images[:, :, 20:] == (255, 0, 0), axis=-1))  # the opaque half is the card
    corners = built.train.images[[i for i, f in enumerate(built.split["train"]) if f.startswith("aug_")], 0, 0]
    assert np.all(corners == (255, 0, 0))  # the corners a rotated augmented copy gained are transparent too
    assert built.preprocessing.background == (255, 0, 0)
