"""synthetic:shapes: deterministic, balanced, standardised, validated, and not solvable by a linear
read-out of the pixels (the class is a shape, not a position, colour or mean image)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bnprobe.data import load_data
from bnprobe.errors import DataError
from bnprobe.synthetic import CLASSES, Split, shapes


@pytest.fixture(scope="module")
def sample() -> tuple[Split, Split]:
    """One mid-sized draw shared by the statistical checks (generating it takes about a second)."""
    return shapes(4096, test=1024, seed=0)


def test_same_seed_same_bytes_other_seed_differs() -> None:
    a, b, c = shapes(40, test=8, seed=5), shapes(40, test=8, seed=5), shapes(40, test=8, seed=6)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], c[0][0]) and not torch.equal(a[1][0], c[1][0])


def test_shapes_dtypes_and_labels() -> None:
    (x, y), (xt, yt) = shapes(30, size=24, channels=1, test=12)
    assert x.shape == (30, 1, 24, 24) and xt.shape == (12, 1, 24, 24)
    assert x.dtype == xt.dtype == torch.float32 and y.dtype == yt.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < len(CLASSES) == 10
    assert torch.isfinite(x).all() and torch.isfinite(xt).all()
    (_, _), (xe, ye) = shapes(10, test=0)
    assert xe.shape == (0, 3, 32, 32) and ye.shape == (0,)


def test_every_class_present_and_balanced(sample: tuple[Split, Split]) -> None:
    (_, y), (_, yt) = sample
    for labels in (y, yt):
        counts = torch.bincount(labels, minlength=10)
        assert int(counts.max()) - int(counts.min()) <= 1  # exactly balanced, up to the remainder
    assert set(shapes(10)[0][1].tolist()) == set(range(10))  # even ten images hold every class


def test_training_images_do_not_depend_on_the_test_split() -> None:
    (x0, y0), _ = shapes(50, test=0, seed=2)
    (x1, y1), (xt, _) = shapes(50, test=30, seed=2)
    assert torch.equal(x0, x1) and torch.equal(y0, y1) and len(xt) == 30


def test_segmentation_masks_label_each_pixel_with_the_shape_it_shows() -> None:
    """The same images as the classification set, and per pixel 0 (background) or 1 + the image's class."""
    (x, y), (xt, yt) = shapes(20, size=24, test=4, seed=3)
    (xm, mask), (xmt, maskt) = shapes(20, size=24, test=4, seed=3, masks=True)
    assert torch.equal(x, xm) and torch.equal(xt, xmt)
    assert mask.shape == (20, 24, 24) and maskt.shape == (4, 24, 24) and mask.dtype == torch.int64
    for labels, masks in ((y, mask), (yt, maskt)):
        for label, m in zip(labels, masks):
            assert set(m.unique().tolist()) == {0, int(label) + 1}  # every object covers some pixels, never all
    segmentation = load_data("synthetic:segmentation", n=8, test=2, size=16)
    assert segmentation.task == "segmentation" and segmentation.num_outputs == 11 and segmentation.input_shape == (3, 16, 16)
    assert segmentation.test is not None and segmentation.example_batch(2)[1].shape == (2, 16, 16)


def test_standardised_by_the_training_set(sample: tuple[Split, Split]) -> None:
    (x, _), (xt, _) = sample
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-4
    assert xt.mean(dim=(0, 2, 3)).abs().max() < 0.1  # the same distribution, so close but not exact
    assert (xt.std(dim=(0, 2, 3)) - 1).abs().max() < 0.1


def test_class_is_not_coded_by_the_place_of_the_mean_image(sample: tuple[Split, Split]) -> None:
    """Positions share one range, so the class-mean images differ by a constant only (a larger
    shape, such as the disc, brightens its mean image all over, since the object is the brighter
    colour): with each mean image's own average taken out, what is left is sampling noise."""
    (x, y), _ = sample
    means = torch.stack([x[y == k].mean(dim=0) for k in range(10)])
    flat = means - means.mean(dim=(2, 3), keepdim=True)
    assert float((flat[:, None] - flat[None]).abs().max()) < 0.5  # pixels have std 1


def test_a_linear_classifier_on_pixels_stays_near_chance(sample: tuple[Split, Split]) -> None:
    """Logistic regression by full-batch gradient descent fits the training images a little but
    cannot generalise: a shape at any place, size, angle and colour is no linear function of pixels."""
    (x, y), (xt, yt) = sample
    features, held_out = x[:2048].flatten(1), xt.flatten(1)
    weights = torch.zeros(features.shape[1], 10, requires_grad=True)
    optimiser = torch.optim.SGD([weights], lr=0.002)
    for _ in range(300):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(features @ weights, y[:2048]).backward()
        optimiser.step()
    accuracy = float(((held_out @ weights).argmax(dim=1) == yt).float().mean())
    assert accuracy < 0.3  # chance is 0.1; a position- or colour-coded class would go far above


def test_load_data_bundles_both_splits() -> None:
    data = load_data("synthetic:shapes", seed=1, n=64, test=16, size=16, channels=1, noise=0.2)
    assert data.input_shape == (1, 16, 16) and data.num_outputs == 10 and len(data) == 64
    assert data.test is not None and len(data.test) == 16  # type: ignore[arg-type]
    assert load_data("synthetic:shapes", n=16, test=0).test is None
    assert load_data("synthetic:cifar10", n=8).test is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n": 1}, r"^data 'synthetic:shapes': n must be an integer from 2 to \d+, got 1$"),
        ({"test": -1}, r"^data 'synthetic:shapes': test must be an integer from 0 to \d+, got -1$"),
        ({"noise": "loud"}, r"^data 'synthetic:shapes': noise must be a number from 0 to \d+, got 'loud'$"),
        ({"size": 4}, r"^data 'synthetic:shapes': size must be an integer from 8 to 512, got 4$"),
        ({"channels": 2.5}, r"^data 'synthetic:shapes': channels must be an integer from 1 to 16, got 2.5$"),
        ({"size": 512, "channels": 16}, r"^data 'synthetic:shapes': n must be an integer from 2 to 64, got 8192$"),
        ({"num_classes": 3}, r"^data 'synthetic:shapes' has no option 'num_classes'; valid: n, test, noise, size, channels$"),
        ({"sise": 3}, r"^data 'synthetic:shapes' has no option 'sise'; did you mean 'size'\?$"),
    ],
)
def test_option_errors_are_one_clear_line(options: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_data("synthetic:shapes", **options)


def test_unknown_spec_message_lists_shapes() -> None:
    with pytest.raises(DataError, match=r"shapes"):
        load_data("synthetic:shape")
    with pytest.raises(DataError, match=r"synthetic:cifar10\|mnist\|linear\|shapes"):
        load_data("synthtic:shapes")
