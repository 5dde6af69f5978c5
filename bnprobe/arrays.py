"""Arrays from .npz and .h5 files: the two named arrays read (no other), and checked before any
training, so a file that cannot be trained on is a one-line error when the data is loaded: a
missing array, non-numbers, a NaN or infinity, lengths or mask sizes that disagree, a negative
label. :func:`bnprobe.data.load_data` turns what they hold into a task.
"""

from __future__ import annotations

import math
import zipfile

import numpy as np
import torch

from .errors import DataError, first_line


def read_checked(kind: str, path: str, x_key: str, y_key: str) -> tuple[torch.Tensor, np.ndarray]:
    """The inputs as float32 samples, and the targets as stored: numbers, finite, one per sample."""
    x_np, y_np = _named_arrays(kind, path, x_key, y_key)
    for key, arr in ((x_key, x_np), (y_key, y_np)):
        if arr.dtype.kind not in "biuf" or arr.ndim == 0:
            raise DataError(f"{path}: array {key!r} holds {arr.dtype} {'scalars' if arr.ndim else 'a scalar'}, not numbers per sample")
        bad = first_non_finite(arr)
        if bad is not None:
            value = "NaN" if np.isnan(arr[bad]) else "inf" if arr[bad] > 0 else "-inf"
            raise DataError(f"{path}: array {key!r} holds {value} at index {list(bad)}; bnprobe trains on finite numbers only")
    if len(x_np) == 0:
        raise DataError(f"{path}: array {x_key!r} holds no samples")
    x = torch.as_tensor(x_np, dtype=torch.float32)
    if len(x) != len(y_np):
        raise DataError(f"{path}: {x_key!r} has {len(x)} samples but {y_key!r} has {len(y_np)}")
    return x, y_np


def is_masks(path: str, x: torch.Tensor, y: np.ndarray, x_key: str, y_key: str) -> bool:
    """Whether integer targets ``y`` are a class per pixel of images ``x`` (N, C, H, W): masks
    (N, H, W) of the images' height and width. Masks of another size are refused, not taken for
    regression targets."""
    if x.ndim != 4 or y.ndim != 3:
        return False
    if tuple(y.shape[1:]) != tuple(x.shape[2:]):
        image, mask = "x".join(map(str, x.shape[2:])), "x".join(map(str, y.shape[1:]))
        raise DataError(f"{path}: masks in {y_key!r} are {mask} but the images in {x_key!r} are {image} (height x width)")
    return True


def count_classes(path: str, labels: torch.Tensor, y_key: str, num_classes: int | None) -> int:
    """The number of classes: ``num_classes`` when given (a class may be absent from the data),
    else the largest label + 1; a negative label or one the count leaves out is refused."""
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise DataError(f"{path}: class labels in {y_key!r} must be 0, 1, 2, ...; found {low}")
    if num_classes is not None and high >= num_classes:
        raise DataError(f"{path}: {y_key!r} holds label {high}, but num_classes is {num_classes} (labels 0 to {num_classes - 1})")
    return high + 1 if num_classes is None else num_classes


def _named_arrays(kind: str, path: str, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x_key`` and ``y_key`` of an .npz or .h5 file; the file's other arrays are not read."""
    keys = (x_key, y_key)
    if kind == "npz":
        try:
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DataError(f"{path} is a single .npy array, not an .npz archive; save x and y with np.savez")
            with loaded as f:
                found = list(f.files)
                arrays = {k: f[k] for k in keys if k in found}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{path} is not a readable .npz file: {first_line(e)}") from e
    else:
        from .store import read_arrays

        arrays, found = read_arrays(path, keys)
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise DataError(f"{path} has no array {missing[0]!r} (found: {', '.join(sorted(found)) or 'none'}); set data_options.x_key / y_key")
    return np.asarray(arrays[x_key]), np.asarray(arrays[y_key])


def first_non_finite(arr: np.ndarray, block_values: int = 2**24) -> tuple[int, ...] | None:
    """The index of the first NaN or infinity in ``arr`` (in C order), or None. Checked at load, as
    a diverged loss would otherwise be the first sign of it; in blocks of samples, so the check
    needs little memory beyond the array's own."""
    if arr.dtype.kind != "f":
        return None
    rows = max(1, block_values // max(1, math.prod(arr.shape[1:])))
    for start in range(0, len(arr), rows):
        bad = ~np.isfinite(arr[start : start + rows])
        if bad.any():
            first = np.unravel_index(int(np.argmax(bad)), bad.shape)
            return (start + int(first[0]), *(int(i) for i in first[1:]))
    return None
