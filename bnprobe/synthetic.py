"""Procedurally drawn shapes: a built-in image task with real visual structure (no download).

Each image holds one object whose class is its shape (disc, ring, square, triangle, plus, bar
pair, star, ellipse, L, half-disc). Everything else is random and independent of the class:
position, scale, rotation, a mild stretch, the colours of object and background (a random
contrasting pair, the object the brighter), a smooth background (gradient plus low-frequency
clutter), a thin distractor stroke behind the object, and pixel noise. A network therefore has to learn shape features invariant to all of
these, which takes it hundreds to thousands of SGD steps; a linear classifier on raw pixels
stays near chance.

Clips (:func:`clips`) are the same scenes in motion: a disc, square or triangle crosses a still
background in one of four directions, and the class is the pair, so no single frame tells it.

Shapes are signed distance fields evaluated on the pixel grid, with one pixel of
anti-aliasing: vectorised torch, no per-pixel Python. Images are rendered in fixed chunks, each
drawing all its randomness from one ``torch.Generator`` in order, so the data depend only on
the seed and the number of images asked for (and the first images not even on that).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

CLASSES = ("disc", "ring", "square", "triangle", "plus", "bars", "star", "ellipse", "ell", "half-disc")
CHUNK = 1024  # images rendered at once: bounds the memory of the per-pixel intermediates
SCALE = (0.5, 0.75)  # object radius, in half-image widths
CLUTTER = 0.04  # amplitude of the low-frequency background blotches
GRADIENT = 0.15  # amplitude of the background's linear ramp, per channel
STROKES = 1  # distractor strokes per image (each present with probability STROKE_P)
STROKE_P = 0.7
CLIP_SHAPES = ("disc", "square", "triangle")  # the shapes a clip may show
DIRECTIONS = ("right", "down", "left", "up")  # headings 0, 90, 180, 270 degrees (image rows grow downwards)
CLIP_CLASSES = tuple(f"{shape} {direction}" for shape in CLIP_SHAPES for direction in DIRECTIONS)
CLIP_SCALE = (0.35, 0.5)  # a clip's object is smaller than an image's: it needs room to move
TRAVEL = (0.7, 0.9)  # how far it moves over the clip, in half-image widths (the largest object still fits)

Split = tuple[Tensor, Tensor]


def shapes(
    n: int, size: int = 32, channels: int = 3, seed: int = 0, noise: float = 0.05, test: int = 0, masks: bool = False
) -> tuple[Split, Split]:
    """``n`` training and ``test`` held-out images ``(N, channels, size, size)`` with labels 0-9, or
    with ``masks`` the same images with per-pixel labels ``(N, size, size)``: 0 for the background,
    1 + the shape's class where it covers at least half the pixel.

    The held-out split is drawn after the training split from the same generator, so the
    training images do not depend on ``test``. Both are standardised with the training set's
    per-channel mean and standard deviation (what a user of a real data set would do).
    """
    g = torch.Generator().manual_seed(seed)
    x, y = _split(n, size, channels, noise, g, masks)
    xt, yt = _split(test, size, channels, noise, g, masks)
    return _standardised((x, y), (xt, yt))


def _split(n: int, size: int, channels: int, noise: float, g: torch.Generator, masks: bool) -> Split:
    """Exactly balanced labels in random order, then the images (and masks) chunk by chunk."""
    y = torch.randperm(n, generator=g) % len(CLASSES)
    x = torch.empty(n, channels, size, size)
    mask = torch.zeros(n, size, size, dtype=torch.long) if masks else None
    for start in range(0, n, CHUNK):
        labels = y[start : start + CHUNK]
        x[start : start + CHUNK], alpha = _render(labels, size, channels, noise, g)
        if mask is not None:
            mask[start : start + CHUNK] = torch.where(alpha[:, 0] >= 0.5, labels[:, None, None] + 1, 0)
    return x, y if mask is None else mask


def _render(y: Tensor, size: int, channels: int, noise: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Background, strokes behind the object, the object, then pixel noise; and the object's coverage."""
    m = len(y)
    grid = (torch.arange(size) + 0.5) * (2.0 / size) - 1.0  # pixel centres in [-1, 1]
    back, front = _colours(m, channels, g)
    image = _background(back, grid, g)
    image = _strokes(image, grid, g)
    alpha = _object(y, grid, g)
    image = image * (1 - alpha) + front * alpha
    return image + noise * torch.randn(image.shape, generator=g), alpha


def clips(
    n: int, frames: int = 8, size: int = 32, channels: int = 3, seed: int = 0, noise: float = 0.05, test: int = 0
) -> tuple[Split, Split]:
    """``n`` training and ``test`` held-out clips ``(N, channels, frames, size, size)``, each one
    shape moving in a straight line over a still background, with labels ``4 * shape + direction``
    (``CLIP_CLASSES``). A single frame, or the frames averaged, shows the shape but not which way
    it goes: the network has to learn over time as well as space.

    Drawn, split and standardised as :func:`shapes` is (the held-out clips after the training ones).
    """
    g = torch.Generator().manual_seed(seed)
    x, y = _clip_split(n, frames, size, channels, noise, g)
    xt, yt = _clip_split(test, frames, size, channels, noise, g)
    return _standardised((x, y), (xt, yt))


def _standardised(train: Split, test: Split) -> tuple[Split, Split]:
    """Both splits scaled with the training set's per-channel (dim 1) mean and standard deviation."""
    (x, y), (xt, yt) = train, test
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return (x.sub_(mean).div_(std), y), (xt.sub_(mean).div_(std), yt)


def _clip_split(n: int, frames: int, size: int, channels: int, noise: float, g: torch.Generator) -> Split:
    """Exactly balanced labels in random order, then the clips chunk by chunk (as many frames as
    ``CHUNK`` images at once)."""
    y = torch.randperm(n, generator=g) % len(CLIP_CLASSES)
    x = torch.empty(n, channels, frames, size, size)
    step = max(1, CHUNK // frames)
    for start in range(0, n, step):
        x[start : start + step] = _render_clip(y[start : start + step], frames, size, channels, noise, g)
    return x, y


def _render_clip(y: Tensor, frames: int, size: int, channels: int, noise: float, g: torch.Generator) -> Tensor:
    """A still background with strokes, then the object frame by frame along its path, then noise.

    The heading is the class's direction give or take 22.5 degrees; the path, ``TRAVEL`` half-image
    widths long, is centred on a random point that keeps the whole path inside the image."""
    m = len(y)
    grid = (torch.arange(size) + 0.5) * (2.0 / size) - 1.0
    back, front = _colours(m, channels, g)
    still = _strokes(_background(back, grid, g), grid, g)
    shape = torch.tensor([CLASSES.index(name) for name in CLIP_SHAPES])[y // len(DIRECTIONS)]
    heading = (y % len(DIRECTIONS))[:, None, None] * (math.pi / 2) + (math.pi / 4) * (torch.rand(m, 1, 1, generator=g) - 0.5)
    travel = TRAVEL[0] + (TRAVEL[1] - TRAVEL[0]) * torch.rand(m, 1, 1, generator=g)
    scale, centre, angle, stretch = _pose(m, CLIP_SCALE, travel[..., None] / 2, g)
    velocity = torch.stack([torch.cos(heading), torch.sin(heading)], dim=1) * (travel / max(frames - 1, 1))[:, None]
    clip = torch.empty(m, channels, frames, size, size)
    for t in range(frames):
        at = centre + velocity * (t - (frames - 1) / 2)
        alpha = _coverage(shape, grid, scale, at, angle, stretch)
        clip[:, :, t] = still * (1 - alpha) + front * alpha
    return clip + noise * torch.randn(clip.shape, generator=g)


def _colours(m: int, channels: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """A contrasting pair of random colours, the object the brighter of the two (a figure on its
    ground): colour tells no class apart, and a small VGG learns the task in hundreds of steps
    (with a coin flip for which one is the object, it stayed at chance for as many)."""
    base = torch.rand(m, channels, generator=g)
    direction = torch.randn(m, channels, generator=g)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-6)
    other = base + (0.45 + 0.35 * torch.rand(m, 1, generator=g)) * direction
    other = torch.where(other < 0, -other, other)  # reflect back into [0, 1] (steps are < 1)
    other = torch.where(other > 1, 2 - other, other)
    brighter = other.mean(dim=1, keepdim=True) > base.mean(dim=1, keepdim=True)
    back, front = torch.where(brighter, base, other), torch.where(brighter, other, base)
    return back[:, :, None, None], front[:, :, None, None]


def _background(colour: Tensor, grid: Tensor, g: torch.Generator) -> Tensor:
    """A plain colour plus a random linear ramp and smooth blotches of about a quarter image."""
    m, c = colour.shape[:2]
    angle = 2 * math.pi * torch.rand(m, 1, 1, 1, generator=g)
    ramp = torch.cos(angle) * grid[None, None, None, :] + torch.sin(angle) * grid[None, None, :, None]
    slope = GRADIENT * (2 * torch.rand(m, c, 1, 1, generator=g) - 1)
    coarse = CLUTTER * torch.randn(m, c, 4, 4, generator=g)
    blotches = torch.nn.functional.interpolate(coarse, size=(len(grid), len(grid)), mode="bicubic", align_corners=False)
    return colour + slope * ramp + blotches


def _strokes(image: Tensor, grid: Tensor, g: torch.Generator) -> Tensor:
    """Thin random line segments in random colours: edges a network must learn to ignore."""
    m, c, size = image.shape[0], image.shape[1], len(grid)
    px, py = grid[None, None, :], grid[None, :, None]
    for _ in range(STROKES):
        a = 2 * torch.rand(m, 2, 1, 1, generator=g) - 1
        angle = 2 * math.pi * torch.rand(m, 1, 1, generator=g)
        length = 0.3 + 0.6 * torch.rand(m, 1, 1, generator=g)
        bx, by = length * torch.cos(angle), length * torch.sin(angle)
        width = 0.4 + 0.6 * torch.rand(m, 1, 1, generator=g)  # half-width in pixels
        on = (torch.rand(m, 1, 1, generator=g) < STROKE_P).float()
        colour = torch.rand(m, c, 1, 1, generator=g)
        dx, dy = px - a[:, 0], py - a[:, 1]
        h = ((dx * bx + dy * by) / (bx * bx + by * by)).clamp(0, 1)
        dist = torch.hypot(dx - bx * h, dy - by * h) * (size / 2) - width
        alpha = ((0.5 - dist).clamp(0, 1) * on)[:, None]
        image = image * (1 - alpha) + colour * alpha
    return image


def _object(y: Tensor, grid: Tensor, g: torch.Generator) -> Tensor:
    """Coverage ``(m, 1, size, size)`` of each image's shape, placed, scaled, stretched and rotated."""
    return _coverage(y, grid, *_pose(len(y), SCALE, 0.0, g))


Pose = tuple[Tensor, Tensor, Tensor, Tensor]  # scale, centre (x, y), rotation, stretch


def _pose(m: int, scale_range: tuple[float, float], margin: Tensor | float, g: torch.Generator) -> Pose:
    """A random size, a centre that keeps the object (and ``margin`` more) inside the image, a
    rotation and a mild stretch."""
    scale = scale_range[0] + (scale_range[1] - scale_range[0]) * torch.rand(m, 1, 1, generator=g)
    centre = (1 - 1.1 * scale[..., None] - margin) * (2 * torch.rand(m, 2, 1, 1, generator=g) - 1)
    angle = 2 * math.pi * torch.rand(m, 1, 1, generator=g)
    stretch = 0.85 + 0.3 * torch.rand(m, 1, 1, generator=g)
    return scale, centre, angle, stretch


def _coverage(y: Tensor, grid: Tensor, scale: Tensor, centre: Tensor, angle: Tensor, stretch: Tensor) -> Tensor:
    """Coverage ``(m, 1, size, size)`` of shape ``SDFS[y]`` in the pose given."""
    m, size = len(y), len(grid)
    dx, dy = grid[None, None, :] - centre[:, 0], grid[None, :, None] - centre[:, 1]
    cos, sin = torch.cos(angle), torch.sin(angle)
    u = (cos * dx + sin * dy) / (scale * stretch)
    v = (cos * dy - sin * dx) * stretch / scale
    dist = torch.empty(m, size, size)
    for k, sdf in enumerate(SDFS):
        idx = (y == k).nonzero().squeeze(1)
        if len(idx):
            dist[idx] = sdf(u[idx], v[idx])
    pixels = dist * scale * (size / 2)  # shape units to pixels
    return (0.5 - pixels).clamp(0, 1)[:, None]


# ----------------------------------------------------------------------------- signed distances
# Each takes shape coordinates (u, v), the shape about one unit in radius, and returns the
# signed distance to its outline (negative inside); unions are a min, intersections a max.


def _box(u: Tensor, v: Tensor, half_u: float, half_v: float, at: tuple[float, float] = (0.0, 0.0)) -> Tensor:
    qu, qv = (u - at[0]).abs() - half_u, (v - at[1]).abs() - half_v
    return torch.hypot(qu.clamp_min(0), qv.clamp_min(0)) + torch.maximum(qu, qv).clamp_max(0)


def _disc(u: Tensor, v: Tensor) -> Tensor:
    return torch.hypot(u, v) - 1.0


def _ring(u: Tensor, v: Tensor) -> Tensor:
    return (torch.hypot(u, v) - 0.72).abs() - 0.28


def _square(u: Tensor, v: Tensor) -> Tensor:
    return _box(u, v, 0.8, 0.8)


def _triangle(u: Tensor, v: Tensor, r: float = 1.05) -> Tensor:
    """Equilateral, centroid at the origin (after Inigo Quilez's exact distance)."""
    k = math.sqrt(3.0)
    x, y = u.abs() - r, v + r / k
    fold = x + k * y > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - x.clamp(-2 * r, 0)
    return -torch.hypot(x, y) * torch.sign(y)


def _plus(u: Tensor, v: Tensor) -> Tensor:
    return torch.minimum(_box(u, v, 1.0, 0.28), _box(u, v, 0.28, 1.0))


def _bars(u: Tensor, v: Tensor) -> Tensor:
    return torch.minimum(_box(u, v, 1.0, 0.22, (0.0, 0.5)), _box(u, v, 1.0, 0.22, (0.0, -0.5)))


def _star(u: Tensor, v: Tensor, r: float = 1.1, inner: float = 0.45) -> Tensor:
    """Five-pointed, folded into one wedge by reflections (after Inigo Quilez's exact distance)."""
    k1u, k1v = 0.809016994375, -0.587785252292
    x, y = u.abs(), v
    for ku, kv in ((k1u, k1v), (-k1u, k1v)):
        d = (ku * x + kv * y).clamp_min(0)
        x, y = x - 2 * d * ku, y - 2 * d * kv
    x, y = x.abs(), y - r
    bu, bv = inner * -k1v, inner * k1u - 1
    h = ((x * bu + y * bv) / (bu * bu + bv * bv)).clamp(0, r)
    return torch.hypot(x - bu * h, y - bv * h) * torch.sign(y * bu - x * bv)


def _ellipse(u: Tensor, v: Tensor, a: float = 1.0, b: float = 0.5) -> Tensor:
    """Two-to-one; the first-order distance, bounded by the scaled one where that is poor (the centre)."""
    k0 = torch.hypot(u / a, v / b)
    k1 = torch.hypot(u / a**2, v / b**2).clamp_min(1e-6)
    return torch.minimum(k0 * (k0 - 1) / k1, (k0 - 1) * min(a, b))


def _ell(u: Tensor, v: Tensor) -> Tensor:
    return torch.minimum(_box(u, v, 0.25, 0.9, (-0.5, 0.0)), _box(u, v, 0.75, 0.25, (0.0, 0.65)))


def _half_disc(u: Tensor, v: Tensor) -> Tensor:
    """Centroid at the origin: the flat side 4/(3 pi) below it."""
    v = v + 4 / (3 * math.pi)
    return torch.maximum(torch.hypot(u, v) - 1.0, -v)


SDFS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (_disc, _ring, _square, _triangle, _plus, _bars, _star, _ellipse, _ell, _half_disc)
