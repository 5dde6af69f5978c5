"""Segmentation: a model of per-pixel logits (a tensor, or a dict's ``"out"`` as torchvision's) trains
on synthetic:segmentation with per-pixel cross-entropy and records pixel accuracy, held out too."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import save_arrays, train_segmenter
from torch import nn
from torch.utils.data import TensorDataset

from bnprobe.config import load_config_text
from bnprobe.data import PixelCrossEntropy, Task, load_data
from bnprobe.errors import DataError, ModelError
from bnprobe.experiment import run_experiment
from bnprobe.probes.heldout import evaluate
from bnprobe.store import HELDOUT, read_file

MODEL = """
import torch.nn as nn

class Seg(nn.Module):
    def __init__(self, num_classes, as_dict):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, num_classes, 1))
        self.as_dict = as_dict

    def forward(self, x):
        out = self.body(x)
        return {"out": out} if self.as_dict else out

def make(num_classes, as_dict=True):
    return Seg(num_classes, as_dict)
"""


def config(tmp_path: Path, model: str, name: str = "seg") -> str:
    (tmp_path / "seg.py").write_text(MODEL)
    return (
        f"name: {name}\nmodel: {model}\ndata: synthetic:segmentation\ndata_options: {{n: 32, test: 8, size: 16}}\n"
        f"steps: 4\nbatch_size: 8\nbn: keep\nvariants: {{bn: [keep, strip]}}\nprobes: {{moments: {{every: 2}}, heldout: {{every: 2}}}}\n"
        f"output: {tmp_path / name}.h5\n"
    )


@pytest.mark.parametrize("as_dict", [True, False])
def test_a_segmentation_model_trains_and_records_pixel_accuracy(tmp_path: Path, as_dict: bool) -> None:
    text = config(tmp_path, f"{tmp_path / 'seg.py'}:make") + f"model_options: {{as_dict: {str(as_dict).lower()}}}\n"
    run_experiment(load_config_text(text, "t"))
    runs = read_file(tmp_path / "seg.h5").runs
    assert set(runs) == {"keep", "strip"}
    for run in runs.values():
        assert run.attrs["task"] == "segmentation" and run.attrs["status"] == "finished"
        acc, loss = run.get("train", "accuracy"), run.get("train", "loss")
        assert np.isfinite(loss).all() and ((acc >= 0) & (acc <= 1)).all()
        assert abs(loss[0] - math.log(11)) < 1.5  # an untrained net is near chance on 11 pixel classes
        held = run.get(HELDOUT, "accuracy")
        assert len(held) and ((held >= 0) & (held <= 1)).all()


def test_a_classifier_on_segmentation_data_says_what_it_needs(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"output has shape \(2, 11\) on a batch of 2; .* needs \(batch, 11, 16, 16\) per-pixel logits"):
        run_experiment(load_config_text(config(tmp_path, "mlp"), "t"))


def test_held_out_pixel_accuracy_matches_a_hand_computation() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1)
    x, y = torch.randn(5, 3, 6, 6), torch.randint(4, (5, 6, 6))
    found = evaluate(model, PixelCrossEntropy(), TensorDataset(x, y), batch_size=2)
    with torch.no_grad():
        out = model(x)
    assert math.isclose(float(found["loss"]), float(nn.functional.cross_entropy(out, y)), rel_tol=1e-6)
    assert math.isclose(float(found["accuracy"]), float((out.argmax(1) == y).float().mean()), rel_tol=1e-6)


def mask_arrays(n: int = 16, size: int = 8, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3, size, size)).astype(np.float32), rng.integers(classes, size=(n, size, size))


@pytest.mark.parametrize("kind", ["npz", "h5"])
def test_integer_masks_of_the_images_size_are_segmentation(tmp_path: Path, kind: str) -> None:

    x, y = mask_arrays()
    path = tmp_path / f"d.{kind}"
    save_arrays(path, x, y)
    data = load_data(f"{kind}:{path}")
    assert data.task is Task.SEGMENTATION and data.num_outputs == 3 and data.input_shape == (3, 8, 8)
    assert load_data(f"{kind}:{path}", num_classes=5).num_outputs == 5  # a class the data lacks
    assert isinstance(data.loss_fn(), PixelCrossEntropy)


def test_a_segmentation_model_trains_on_masks_from_a_file(tmp_path: Path) -> None:
    x, y = mask_arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    run = train_segmenter(tmp_path, f"npz:{tmp_path / 'd.npz'}", batch_size=4)
    assert run.attrs["task"] == "segmentation" and run.attrs["status"] == "finished"
    loss = run.get("train", "loss")
    assert loss is not None and abs(loss[0] - math.log(3)) < 1.0


@pytest.mark.parametrize(
    ("y", "options", "message"),
    [
        (np.zeros((16, 8, 6), dtype=np.int64), {}, r"masks in 'y' are 8x6 but the images in 'x' are 8x8 \(height x width\)$"),
        (np.full((16, 8, 8), 3), {"num_classes": 3}, r"'y' holds label 3, but num_classes is 3 \(labels 0 to 2\)$"),
        (np.full((16, 8, 8), -1), {}, r"class labels in 'y' must be 0, 1, 2, ...; found -1$"),
        (np.zeros((16, 2), dtype=np.float32), {"num_classes": 3}, r"num_classes is for integer labels or masks; 'y' holds float32 targets"),
    ],
)
def test_masks_that_do_not_fit_are_refused(tmp_path: Path, y: np.ndarray, options: dict[str, int], message: str) -> None:
    np.savez(tmp_path / "d.npz", x=mask_arrays()[0], y=y)
    with pytest.raises(DataError, match=message):
        load_data(f"npz:{tmp_path / 'd.npz'}", **options)
