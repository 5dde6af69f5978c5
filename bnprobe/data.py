"""Data sources: built-in synthetic sets (no download), torchvision sets and ImageFolder from local
files, and arrays from .npz / .h5 files. Every source yields a :class:`DataBundle`.

Specs: ``synthetic:cifar10``, ``synthetic:mnist``, ``synthetic:linear``, ``synthetic:shapes``,
``synthetic:segmentation``, ``synthetic:clips``, ``torchvision:CIFAR10:ROOT`` (any torchvision
classification set), ``imagefolder:DIR``, ``segfolder:DIR`` (image/mask pairs), ``npz:FILE``,
``h5:FILE``.

``synthetic:shapes`` (:mod:`bnprobe.synthetic`) is the built-in task with visual structure: ten
classes of drawn shapes at random position, scale, rotation and colour over a cluttered
background, with a held-out split (``DataBundle.test``); ``synthetic:segmentation`` is the same
images with a class per pixel (background or shape); ``synthetic:clips`` is short videos
``(channels, frames, height, width)`` of a shape moving, its class the shape and the direction.
``synthetic:cifar10`` / ``mnist`` are a smooth prototype per class plus noise: quick to fit,
good for smoke tests and overhead timing.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, TensorDataset

from .arrays import count_classes, is_masks, read_checked
from .arrays import first_non_finite as first_non_finite  # public here before the file readers had their own module
from .errors import DataError, did_you_mean, first_line, shown, usable_path
from .synthetic import CLIP_CLASSES, clips, shapes

SYNTHETIC_SHAPES = {"cifar10": (3, 32, 32), "mnist": (1, 28, 28)}
MAX_SYNTHETIC_VALUES = 2**28  # numbers a built-in set may hold: 1 GiB of float32
MAX_CLASSES = 2**16  # a num_classes option for data on disk: 16-bit masks' labels


class Task(str, enum.Enum):
    """What the targets are. A ``str``, shown and stored as the plain word, so the run's ``task``
    attribute and comparisons with ``"classification"`` are unchanged."""

    CLASSIFICATION = "classification"  # integer class labels: cross-entropy, accuracy
    REGRESSION = "regression"  # real-valued target vectors: mean squared error
    SEGMENTATION = "segmentation"  # a class label per pixel: per-pixel cross-entropy, pixel accuracy

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass
class DataBundle:
    """A training set plus what the model and loss need to know about it."""

    train: Dataset[Any]
    input_shape: tuple[int, ...]
    num_outputs: int  # classes for classification, target dimension for regression
    task: Task  # a plain "classification" / "regression" is taken too, and becomes the member
    spec: str
    test: Dataset[Any] | None = None  # a held-out split from the same distribution, where the source has one

    def __post_init__(self) -> None:
        self.task = Task(self.task)  # the boundary: a plain string becomes the member, a wrong one a ValueError

    def __len__(self) -> int:
        return len(self.train)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; every set loaded here has one

    def loss_fn(self) -> torch.nn.Module:
        """Cross-entropy for classification, per pixel for segmentation, mean squared error for regression."""
        if self.task is Task.SEGMENTATION:
            return PixelCrossEntropy()
        return torch.nn.CrossEntropyLoss() if self.task is Task.CLASSIFICATION else torch.nn.MSELoss()

    def example_batch(self, size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``size`` samples as a batch (for tracing and layer discovery)."""
        try:
            xs, ys = zip(*(self.train[i] for i in range(min(size, len(self)))))
            return torch.stack(list(xs)), torch.as_tensor(np.asarray([np.asarray(y) for y in ys]))
        except (OSError, ValueError, TypeError, RuntimeError) as e:  # an unreadable image, samples of different sizes
            raise DataError(f"{self.spec}: cannot read its first {size} samples: {first_line(e)}") from e


def pixel_logits(output: object) -> torch.Tensor:
    """A segmentation model's per-pixel logits ``(N, C, H, W)``: the output itself, or its ``"out"``
    as torchvision's segmentation models return them (``"aux"``, when asked for, is left out)."""
    logits = output.get("out") if isinstance(output, Mapping) else output
    if not isinstance(logits, torch.Tensor):
        raise DataError(
            f"a segmentation model must return per-pixel logits, as a tensor or under 'out' of a dict; got {type(output).__name__}"
        )
    return logits


class PixelCrossEntropy(torch.nn.CrossEntropyLoss):
    """Cross-entropy per pixel on :func:`pixel_logits` of the model's output."""

    def forward(self, input: object, target: torch.Tensor) -> torch.Tensor:
        return super().forward(pixel_logits(input), target)


def load_data(spec: str, seed: int = 0, **options: Any) -> DataBundle:
    """Load the data set named by ``spec``; ``options`` are source-specific (e.g. ``n``, ``x_key``)."""
    kind, _, rest = spec.partition(":")
    loaders = {"synthetic": _synthetic, "torchvision": _torchvision, "imagefolder": _imagefolder, "npz": _arrays, "h5": _arrays}
    loaders["segfolder"] = _segfolder
    if kind not in loaders or not rest:
        hint = did_you_mean(kind, loaders) if kind not in loaders else ""
        raise DataError(
            f"unknown data spec {shown(spec)}; use synthetic:cifar10|mnist|linear|shapes|segmentation|clips, torchvision:NAME:ROOT, imagefolder:DIR, segfolder:DIR, npz:FILE or h5:FILE{hint}"
        )
    return loaders[kind](kind, rest, seed, dict(options))


def _reject_unknown(spec: str, options: dict[str, Any], valid: tuple[str, ...]) -> None:
    for key in options:
        if not isinstance(key, str):
            raise DataError(f"data {shown(spec)}: option names must be strings, got {shown(key)}")
        if key not in valid:
            hint = did_you_mean(key, valid, otherwise=f"; valid: {', '.join(valid) or 'none'}")
            raise DataError(f"data {shown(spec)} has no option {shown(key)}{hint}")


def _number(spec: str, options: dict[str, Any], key: str, low: int, high: int, integer: bool = True) -> None:
    """Check ``options[key]`` (when given) is a number in [low, high]: checked here, before any
    tensor is made, so ``n: -5`` or ``n: 1e12`` is a one-line error rather than a crash or an
    attempt to allocate terabytes."""
    if key not in options:
        return
    value = options[key]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise DataError(f"data {shown(spec)}: {key} must be {what} from {low} to {high}, got {shown(value)}")


def _text(spec: str, options: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if key in options and not isinstance(options[key], str):
            raise DataError(f"data {shown(spec)}: {key} must be a string, got {shown(options[key])}")


# ----------------------------------------------------------------------------- synthetic


def _synthetic(kind: str, name: str, seed: int, options: dict[str, Any]) -> DataBundle:
    spec = f"{kind}:{name}"
    if name == "linear":
        _reject_unknown(spec, options, ("n", "dim", "out_dim"))
        if options.get("out_dim", 0) is None:
            del options["out_dim"]  # None is the default: as many outputs as inputs
        for key in ("dim", "out_dim"):
            _number(spec, options, key, 1, 2**16)
        dims = options.get("dim", 10) + (options.get("out_dim") or options.get("dim", 10))
        _number(spec, options, "n", 2, MAX_SYNTHETIC_VALUES // dims)
        return synthetic_linear(seed=seed, **options)
    if name in ("shapes", "segmentation"):
        return _shapes(spec, seed, options, masks=name == "segmentation")
    if name == "clips":
        return _clips(spec, seed, options)
    if name not in SYNTHETIC_SHAPES:
        names = [*SYNTHETIC_SHAPES, "linear", "shapes", "segmentation", "clips"]
        raise DataError(f"unknown synthetic set {shown(name)}; choose from {', '.join(names)}")
    _reject_unknown(spec, options, ("n", "num_classes", "noise"))
    _number(spec, options, "n", 2, MAX_SYNTHETIC_VALUES // math.prod(SYNTHETIC_SHAPES[name]))
    _number(spec, options, "num_classes", 1, 10_000)
    _number(spec, options, "noise", 0, 10**6, integer=False)
    return synthetic_images(name, seed=seed, **options)


def _shapes(spec: str, seed: int, options: dict[str, Any], masks: bool) -> DataBundle:
    """Validate the options (size and channels first: they bound how many images fit), then draw;
    with ``masks``, the segmentation set (11 classes: the background and the 10 shapes)."""
    _reject_unknown(spec, options, ("n", "test", "noise", "size", "channels"))
    _number(spec, options, "size", 8, 512)
    _number(spec, options, "channels", 1, 16)
    _number(spec, options, "noise", 0, 10**6, integer=False)
    size, channels = options.get("size", 32), options.get("channels", 3)
    options = {"n": 8192, "test": 1024, **options}  # checked with the defaults: a large size may leave no room for them
    room = MAX_SYNTHETIC_VALUES // ((channels + 2 * masks) * size * size)  # an int64 mask takes two float32s' room
    _number(spec, options, "n", 2, room)
    _number(spec, options, "test", 0, room - options["n"])
    (x, y), (xt, yt) = shapes(seed=seed, masks=masks, **options)
    test = TensorDataset(xt, yt) if len(yt) else None
    task, classes = (Task.SEGMENTATION, 11) if masks else (Task.CLASSIFICATION, 10)
    return DataBundle(TensorDataset(x, y), (channels, size, size), classes, task, spec, test=test)


def _clips(spec: str, seed: int, options: dict[str, Any]) -> DataBundle:
    """Validate the options (the clip's size first: it bounds how many clips fit), then draw."""
    _reject_unknown(spec, options, ("n", "test", "noise", "size", "frames", "channels"))
    _number(spec, options, "size", 8, 512)
    _number(spec, options, "frames", 2, 256)
    _number(spec, options, "channels", 1, 16)
    _number(spec, options, "noise", 0, 10**6, integer=False)
    shape = (options.get("channels", 3), options.get("frames", 8), options.get("size", 32), options.get("size", 32))
    options = {"n": 2048, "test": 512, **options}
    room = MAX_SYNTHETIC_VALUES // math.prod(shape)
    _number(spec, options, "n", 2, room)
    _number(spec, options, "test", 0, room - options["n"])
    (x, y), (xt, yt) = clips(seed=seed, **options)
    test = TensorDataset(xt, yt) if len(yt) else None
    return DataBundle(TensorDataset(x, y), shape, len(CLIP_CLASSES), Task.CLASSIFICATION, spec, test=test)


def synthetic_images(name: str, seed: int = 0, n: int = 4096, num_classes: int = 10, noise: float = 3.0) -> DataBundle:
    """Images of a fixed shape: a smooth random prototype per class, randomly scaled, plus pixel noise.

    Learnable but not trivial: the class signal is low-frequency and each sample rescales and
    shifts it, so a CNN needs a few hundred steps to get well above chance.
    """
    c, h, w = SYNTHETIC_SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, c, 4, 4, generator=g)
    prototypes = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    prototypes = prototypes / prototypes.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    y = torch.randint(num_classes, (n,), generator=g)
    scale = 0.3 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    shift = 0.5 * torch.randn(n, c, 1, 1, generator=g)
    x = scale * prototypes[y] + shift + noise * torch.randn(n, c, h, w, generator=g)
    return DataBundle(TensorDataset(x, y), (c, h, w), num_classes, Task.CLASSIFICATION, f"synthetic:{name}")


def synthetic_linear(seed: int = 0, n: int = 1024, dim: int = 10, out_dim: int | None = None) -> DataBundle:
    """x ~ N(0, I), y = A x with a fixed random A (the deep-linear-network task of Santurkar et al.)."""
    out_dim = out_dim or dim
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(out_dim, dim, generator=g) / math.sqrt(dim)
    x = torch.randn(n, dim, generator=g)
    return DataBundle(TensorDataset(x, x @ a.T), (dim,), out_dim, Task.REGRESSION, "synthetic:linear")


# ----------------------------------------------------------------------------- files on disk


def _torchvision(kind: str, rest: str, seed: int, options: dict[str, Any]) -> DataBundle:
    import torchvision
    from torchvision import transforms

    name, _, root = rest.partition(":")
    spec = f"{kind}:{rest}"
    _reject_unknown(spec, options, ("split",))
    _text(spec, options, "split")
    available = [n for n in dir(torchvision.datasets) if n[0].isupper()]
    if name not in available:
        raise DataError(f"unknown torchvision data set {shown(name)}{did_you_mean(name, available, n=3)}")
    if not root:
        raise DataError(f"{spec}: give the local root, e.g. torchvision:{name}:data/ (nothing is downloaded)")
    if not usable_path(root, DataError).is_dir():
        raise DataError(f"data root {root} does not exist (bnprobe never downloads; put the files there first)")
    cls = getattr(torchvision.datasets, name)
    try:
        train = options.get("split", "train") == "train"
        try:
            ds = cls(root, train=train, download=False, transform=transforms.ToTensor())
        except TypeError:
            ds = cls(root, split=options.get("split", "train"), download=False, transform=transforms.ToTensor())
    except TypeError as e:  # FakeData, ImageFolder, VisionDataset...: not a set stored under a root
        hint = f"; for a folder of images use imagefolder:{root}" if "Folder" in name else ""
        raise DataError(f"torchvision:{name} is not a classification set bnprobe can load from a root ({first_line(e)}){hint}") from e
    except (RuntimeError, OSError, ValueError) as e:
        raise DataError(f"{name} not found under {root}: {first_line(e)}") from e
    return _classification_bundle(ds, spec)


def _imagefolder(kind: str, root: str, seed: int, options: dict[str, Any]) -> DataBundle:
    from torchvision import datasets, transforms

    spec = f"{kind}:{root}"
    _reject_unknown(spec, options, ("image_size",))
    _image_size(spec, options)
    if not usable_path(root, DataError).is_dir():
        raise DataError(f"image folder {root} does not exist")
    steps: list[Any] = []
    if options.get("image_size"):
        steps += [transforms.Resize(options["image_size"]), transforms.CenterCrop(options["image_size"])]

    from .segfolder import reading

    class ImageFolder(datasets.ImageFolder):  # type: ignore[misc]  # torchvision ships no types: its classes are Any
        make_dataset = staticmethod(_samples_once)

    def load(path: str) -> Any:
        """An image, or one line naming a file that cannot be read (found when training reaches it)."""
        with reading(path):
            return datasets.folder.default_loader(path)

    try:
        ds = ImageFolder(root, transform=transforms.Compose([*steps, transforms.ToTensor()]), loader=load)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"image folder {root}: {first_line(e)}") from e
    return _classification_bundle(ds, spec)


def _image_size(spec: str, options: dict[str, Any]) -> tuple[int, int] | None:
    """The ``image_size`` option as (height, width), checked: an integer is a square."""
    size = options.get("image_size")
    if size is None:
        return None
    sizes = size if isinstance(size, list) and len(size) == 2 else [size]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in sizes):
        raise DataError(f"data {shown(spec)}: image_size must be an integer from 1 to 4096 or [height, width], got {shown(size)}")
    return int(sizes[0]), int(sizes[-1])


def _segfolder(kind: str, root: str, seed: int, options: dict[str, Any]) -> DataBundle:
    """Image/mask pairs from ``root/images`` and ``root/masks`` (:mod:`bnprobe.segfolder`; it
    imports PIL, so only when asked, like torchvision here)."""
    from .segfolder import mask_pairs

    spec = f"{kind}:{root}"
    _reject_unknown(spec, options, ("image_size", "num_classes"))
    size = _image_size(spec, options)
    _number(spec, options, "num_classes", 1, MAX_CLASSES)
    if not usable_path(root, DataError).is_dir():
        raise DataError(f"segmentation folder {root} does not exist")
    pairs, (height, width), classes = mask_pairs(root, size, options.get("num_classes"))
    return DataBundle(pairs, (3, height, width), classes, Task.SEGMENTATION, spec)


def _samples_once(
    directory: str | os.PathLike[str],
    class_to_idx: dict[str, int],
    extensions: tuple[str, ...] | None = None,
    is_valid_file: Callable[[str], bool] | None = None,
    allow_empty: bool = False,
) -> list[tuple[str, int]]:
    """ImageFolder's ``(file, class)`` samples, in its order, with every directory entered once:
    torchvision follows symbolic links without remembering where it has been, so a link to a
    folder above repeats its images as deep as the OS allows, and two such links without end."""
    from torchvision.datasets.folder import has_file_allowed_extension

    valid = is_valid_file or (lambda path: has_file_allowed_extension(path, extensions or ()))
    seen: set[str] = set()
    samples: list[tuple[str, int]] = []
    for name, index in sorted(class_to_idx.items()):
        found: list[tuple[str, list[str]]] = []
        for folder, subfolders, files in os.walk(os.path.join(directory, name), followlinks=True):
            if os.path.realpath(folder) in seen:
                subfolders.clear()  # been here: a loop, or a link to a folder already counted
                continue
            seen.add(os.path.realpath(folder))
            found.append((folder, files))
        samples += [(path, index) for folder, files in sorted(found) for f in sorted(files) if valid(path := os.path.join(folder, f))]
    filled = {index for _, index in samples}
    empty = [name for name, index in class_to_idx.items() if index not in filled]
    if empty and not allow_empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))}")
    return samples


def _classification_bundle(ds: Any, spec: str) -> DataBundle:
    if len(ds) == 0:
        raise DataError(f"{spec} holds no samples")
    try:
        x0, _ = ds[0]
    except (OSError, ValueError, TypeError) as e:  # an unreadable image, a sample that is no (x, y) pair
        raise DataError(f"{spec}: cannot read its first sample: {first_line(e)}") from e
    if not isinstance(x0, torch.Tensor):
        raise DataError(f"{spec}: samples are {type(x0).__name__}, not tensors")
    num_classes = len(getattr(ds, "classes", [])) or int(max(int(ds[i][1]) for i in range(len(ds)))) + 1
    return DataBundle(ds, tuple(x0.shape), num_classes, Task.CLASSIFICATION, spec)


def _arrays(kind: str, path: str, seed: int, options: dict[str, Any]) -> DataBundle:
    """Arrays ``x`` and ``y`` of an .npz or .h5 file (:mod:`bnprobe.arrays` reads and checks them):
    integer labels are classes, integer masks of the images' size segmentation, others regression."""
    spec = f"{kind}:{path}"
    _reject_unknown(spec, options, ("x_key", "y_key", "num_classes"))
    _text(spec, options, "x_key", "y_key")
    _number(spec, options, "num_classes", 1, MAX_CLASSES)
    x_key, y_key = options.get("x_key", "x"), options.get("y_key", "y")
    if not usable_path(path, DataError).is_file():
        raise DataError(f"data file {path} does not exist")
    x, y_np = read_checked(kind, path, x_key, y_key)
    if np.issubdtype(y_np.dtype, np.integer) and (y_np.ndim == 1 or is_masks(path, x, y_np, x_key, y_key)):
        y = torch.as_tensor(y_np, dtype=torch.long)
        classes = count_classes(path, y, y_key, options.get("num_classes"))
        task = Task.CLASSIFICATION if y.ndim == 1 else Task.SEGMENTATION
        return DataBundle(TensorDataset(x, y), tuple(x.shape[1:]), classes, task, spec)
    if "num_classes" in options:
        raise DataError(f"{path}: num_classes is for integer labels or masks; {y_key!r} holds {y_np.dtype} targets, which mean regression")
    y = torch.as_tensor(y_np, dtype=torch.float32)
    if y.ndim == 1:
        y = y[:, None]
    return DataBundle(TensorDataset(x, y), tuple(x.shape[1:]), int(y.shape[1]), Task.REGRESSION, spec)


# ----------------------------------------------------------------------------- batches


def batches(
    bundle: DataBundle, batch_size: int, seed: int, start: int = 0, shard: tuple[int, int] = (0, 1)
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches, epoch after epoch; the order depends only on ``seed``.

    ``start`` skips that many batches (a resumed run continues the same sequence).
    Incomplete last batches are dropped (BN raises on a batch of one, and a short batch would
    change the statistics the probes see). ``shard=(rank, processes)`` yields that process's
    share of each batch, every ``processes``-th sample from ``rank`` on (DistributedSampler's
    deal): the shards together are the one-process batch, and only they are loaded.
    """
    if batch_size > len(bundle):
        raise DataError(f"batch size {batch_size} is larger than the data set ({len(bundle)} samples)")
    g = torch.Generator().manual_seed(seed)
    rank, processes = shard
    if isinstance(bundle.train, TensorDataset):
        x, y = bundle.train.tensors
        while True:
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x) - batch_size + 1, batch_size):
                if start > 0:
                    start -= 1
                    continue
                idx = order[i : i + batch_size][rank::processes]
                yield x[idx], y[idx]
    # DataLoader(shuffle=True, generator=g) samples these same batches: the order is unchanged
    sampler = _Shards(BatchSampler(RandomSampler(range(len(bundle)), generator=g), batch_size, drop_last=True), rank, processes, start)
    loader = DataLoader(bundle.train, batch_sampler=sampler, generator=g)
    while True:
        yield from loader


class _Shards(Sampler[list[int]]):
    """The index batches of ``batches``, the first ``skip`` of them skipped (without loading their
    samples), each cut to one process's share."""

    def __init__(self, batches: BatchSampler, rank: int, processes: int, skip: int) -> None:
        self.batches, self.rank, self.processes, self.skip = batches, rank, processes, skip

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            if self.skip > 0:
                self.skip -= 1
                continue
            yield batch[self.rank :: self.processes]

    def __len__(self) -> int:
        return len(self.batches)
