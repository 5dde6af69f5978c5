"""segfolder:DIR: image/mask pairs of the same name stem train segmentation; a pair that is
missing, mismatched or not class indices is one line at load."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import train_segmenter
from PIL import Image

from bnprobe.data import Task, batches, load_data
from bnprobe.errors import DataError

PALETTE = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]


def pair(root: Path, stem: str, size: tuple[int, int] = (8, 8), label: int = 1, image: str = "png", mask_mode: str = "P") -> np.ndarray:
    """An image and its mask (``label`` on the left half); the mask's labels are returned."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    h, w = size
    rng = np.random.default_rng(len(stem))
    Image.fromarray(rng.integers(256, size=(h, w, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.{image}")
    labels = np.zeros((h, w), dtype=np.uint8)
    labels[:, : w // 2] = label
    mask = Image.fromarray(labels).convert(mask_mode) if mask_mode != "P" else Image.fromarray(labels, mode="P")
    if mask_mode == "P":
        mask.putpalette(PALETTE)
    mask.save(root / "masks" / f"{stem}.png")
    return labels


def test_pairs_load_as_segmentation_with_a_class_per_label(tmp_path: Path) -> None:
    labels = pair(tmp_path, "a", label=2)
    pair(tmp_path, "b", image="jpg", mask_mode="L")
    pair(tmp_path, "c")
    (tmp_path / "images" / "notes.txt").write_text("not an image")  # other files are ignored
    data = load_data(f"segfolder:{tmp_path}")
    assert data.task is Task.SEGMENTATION and data.num_outputs == 3 and data.input_shape == (3, 8, 8) and len(data) == 3
    x, y = data.train[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert y.dtype == torch.long and torch.equal(y, torch.from_numpy(labels).long())
    xb, yb = next(batches(data, 2, seed=0))
    assert xb.shape == (2, 3, 8, 8) and yb.shape == (2, 8, 8)
    assert load_data(f"segfolder:{tmp_path}", num_classes=4).num_outputs == 4


def test_image_size_resizes_images_bilinear_and_masks_nearest(tmp_path: Path) -> None:
    pair(tmp_path, "a", size=(8, 8), label=2)
    pair(tmp_path, "b", size=(6, 10), label=1)
    with pytest.raises(DataError, match=r"images differ in size \(a.png is 8x8, b.png 6x10\); set data_options.image_size to resize them$"):
        load_data(f"segfolder:{tmp_path}")
    data = load_data(f"segfolder:{tmp_path}", image_size=[4, 5])
    assert data.input_shape == (3, 4, 5)
    for i, label in enumerate((2, 1)):
        x, y = data.train[i]
        assert x.shape == (3, 4, 5) and y.shape == (4, 5)
        assert set(y.unique().tolist()) == {0, label}  # nearest: no label is a blend of two
    assert load_data(f"segfolder:{tmp_path}", image_size=6).train[1][0].shape == (3, 6, 6)


def test_a_segmentation_model_trains_on_a_folder(tmp_path: Path) -> None:
    for stem in "abcd":
        pair(tmp_path / "data", stem)
    run = train_segmenter(tmp_path, f"segfolder:{tmp_path / 'data'}", batch_size=2)
    assert run.attrs["task"] == "segmentation" and run.attrs["status"] == "finished"
    loss = run.get("train", "loss")
    assert loss is not None and np.isfinite(loss).all()


def image_without_mask(root: Path) -> None:
    pair(root, "a")
    pair(root, "b")
    (root / "masks" / "b.png").unlink()


def masks_without_images(root: Path) -> None:
    for stem in "abc":
        pair(root, stem)
    for stem in "bc":
        (root / "images" / f"{stem}.png").unlink()


def small_mask(root: Path) -> None:
    pair(root, "a")
    Image.new("L", (8, 6)).save(root / "masks" / "a.png")


def rgb_mask(root: Path) -> None:
    pair(root, "a")
    Image.new("RGB", (8, 8)).save(root / "masks" / "a.png")


def broken_image(root: Path) -> None:
    pair(root, "a")
    (root / "images" / "a.png").write_bytes(b"not a png")


def two_images_one_stem(root: Path) -> None:
    pair(root, "a")
    pair(root, "a", image="jpg")


def empty_folders(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()


@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        (image_without_mask, {}, "image b.png has no mask of the same name stem"),
        (masks_without_images, {}, "mask b.png has no image of the same name stem (and 1 more)"),
        (small_mask, {}, "is 6x8 but its image a.png is 8x8 (height x width)"),
        (
            lambda r: (r / "images").mkdir(parents=True),
            {},
            "needs the folders images/ and masks/ (an image and its mask share a name stem); masks/ is missing",
        ),
        (empty_folders, {}, "images/ holds no png/jpg/jpeg files"),
        (two_images_one_stem, {}, "a.jpg and a.png in images/ share a name stem; keep one"),
        (rgb_mask, {}, "is a RGB image; save class indices as a palette or grayscale PNG"),
        (broken_image, {}, "cannot read"),
        (lambda r: pair(r, "a", label=3), {"num_classes": 3}, "a mask holds label 3, but num_classes is 3 (labels 0 to 2)"),
        (lambda r: None, {}, "segmentation folder"),
    ],
)
def test_pairs_that_do_not_fit_are_refused_in_one_line(
    tmp_path: Path, make: Callable[[Path], object], options: dict[str, int], message: str
) -> None:
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DataError, match=re.escape(message)) as raised:
        load_data(f"segfolder:{root}", **options)
    assert "\n" not in str(raised.value)


def test_an_image_that_turns_unreadable_after_the_check_is_one_line_naming_it(tmp_path: Path) -> None:
    """The load reads each image's header; a file cut short (or replaced) later fails when training reads it."""
    pair(tmp_path, "a")
    pair(tmp_path, "b")
    data = load_data(f"segfolder:{tmp_path}")
    image = tmp_path / "images" / "b.png"
    image.write_bytes(image.read_bytes()[:40])  # the header survives, the pixels do not
    with pytest.raises(DataError, match=r"^cannot read .*images/b\.png: "):
        data.train[1]
