"""Image/mask pairs from a folder, for segmentation: ``DIR/images/NAME.png|jpg`` with
``DIR/masks/NAME.png``, the mask a class index per pixel (a palette or grayscale PNG).

Every pair is checked when the data is loaded (each mask is read once, to count the classes and
check its size against its image's), so a missing or mismatched file is a one-line error then
rather than a crash mid-run. Images are read again as training uses them, not held in memory; one
that cannot be read then (cut short, replaced) is a one-line error naming it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .errors import DataError, first_line, usable_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_SUFFIXES = (".png",)

Size = tuple[int, int]  # (height, width)


class MaskPairs(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``(image, mask)`` samples: RGB floats in [0, 1] (C, H, W) and class indices (H, W), resized
    to ``size`` when given (bilinear for the image, nearest for the mask: no label is blended)."""

    def __init__(self, pairs: list[tuple[Path, Path]], size: Size | None) -> None:
        self.pairs, self.size = pairs, size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        with reading(image_path), Image.open(image_path) as opened:  # read again, maybe changed since the check
            image = opened.convert("RGB")
        with reading(mask_path), Image.open(mask_path) as opened:
            mask = opened.copy()
        if self.size is not None:
            image = image.resize(self.size[::-1], Image.Resampling.BILINEAR)
            mask = mask.resize(self.size[::-1], Image.Resampling.NEAREST)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        return x, torch.from_numpy(np.asarray(mask).astype(np.int64))


def mask_pairs(root: str, size: Size | None, num_classes: int | None) -> tuple[MaskPairs, Size, int]:
    """The pairs under ``root``, their images' (height, width) as training sees them, and their
    number of classes (``num_classes``, or the largest label + 1)."""
    for folder in ("images", "masks"):
        if not usable_path(Path(root) / folder, DataError).is_dir():
            raise DataError(
                f"segfolder:{root} needs the folders images/ and masks/ (an image and its mask share a name stem); {folder}/ is missing"
            )
    images, masks = (_files(root, folder, suffixes) for folder, suffixes in (("images", IMAGE_SUFFIXES), ("masks", MASK_SUFFIXES)))
    for have, lack, what, other in ((images, masks, "image", "mask"), (masks, images, "mask", "image")):
        alone = sorted(set(have) - set(lack))
        if alone:
            more = f" (and {len(alone) - 1} more)" if len(alone) > 1 else ""
            raise DataError(f"segfolder:{root}: {what} {have[alone[0]].name} has no {other} of the same name stem{more}")
    pairs = [(images[stem], masks[stem]) for stem in sorted(images)]
    checked = {image: _check_pair(image, mask) for image, mask in pairs}
    high = max(label for label, _ in checked.values())
    if num_classes is not None and high >= num_classes:
        raise DataError(f"segfolder:{root}: a mask holds label {high}, but num_classes is {num_classes} (labels 0 to {num_classes - 1})")
    sizes: dict[Size, Path] = {}  # each size's first image
    for image, (_, found) in checked.items():
        sizes.setdefault(found, image)
    if size is None and len(sizes) > 1:
        (a, path_a), (b, path_b) = list(sizes.items())[:2]
        raise DataError(
            f"segfolder:{root}: images differ in size ({path_a.name} is {a[0]}x{a[1]}, {path_b.name} {b[0]}x{b[1]}); "
            "set data_options.image_size to resize them"
        )
    return MaskPairs(pairs, size), size or next(iter(sizes)), high + 1 if num_classes is None else num_classes


def _files(root: str, folder: str, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """The files of ``root/folder`` with one of ``suffixes`` (in any case), by name stem."""
    where = Path(root) / folder
    found: dict[str, Path] = {}
    for path in sorted(where.iterdir()):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if path.stem in found:
            raise DataError(f"segfolder:{root}: {found[path.stem].name} and {path.name} in {folder}/ share a name stem; keep one")
        found[path.stem] = path
    if not found:
        raise DataError(f"segfolder:{root}: {folder}/ holds no {'/'.join(s[1:] for s in suffixes)} files")
    return found


def _check_pair(image_path: Path, mask_path: Path) -> tuple[int, Size]:
    """The largest label of the mask, once it is known to be class indices of its image's size,
    and that size (height, width)."""
    with reading(image_path), Image.open(image_path) as image:
        width, height = image.size
    with reading(mask_path), Image.open(mask_path) as mask:
        mode, labels = mask.mode, np.asarray(mask)
    if labels.ndim != 2 or labels.dtype.kind not in "biu":
        raise DataError(f"mask {mask_path} is a {mode} image; save class indices as a palette or grayscale PNG")
    if labels.shape != (height, width):
        found = "x".join(map(str, labels.shape))
        raise DataError(f"mask {mask_path} is {found} but its image {image_path.name} is {height}x{width} (height x width)")
    if labels.min() < 0:
        raise DataError(f"mask {mask_path} holds label {int(labels.min())}; class labels must be 0, 1, 2, ...")
    return int(labels.max()), (height, width)


@contextlib.contextmanager
def reading(path: Path | str) -> Iterator[None]:
    """A file PIL cannot open or decode (not an image, truncated) as one line naming it."""
    try:
        yield
    except UnidentifiedImageError as e:  # its message repeats the path inside a file object's repr
        raise DataError(f"cannot read {path}: not an image file PIL can identify") from e
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {first_line(e)}") from e
