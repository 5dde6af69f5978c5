"""Video: synthetic:clips is deterministic, balanced and moves each shape its class's way; a 3D-conv
model trains on it (and on 5-D npz arrays) with moments per channel and ICS recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bnprobe.config import load_config_text
from bnprobe.data import load_data
from bnprobe.errors import DataError
from bnprobe.experiment import run_experiment
from bnprobe.store import HELDOUT, read_file
from bnprobe.synthetic import CLIP_CLASSES, DIRECTIONS, clips

MODEL = """
import torch.nn as nn

def make(num_classes, bn=True):
    norm = [nn.BatchNorm3d(4)] if bn else []
    return nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), *norm, nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, num_classes))
"""


def test_same_seed_same_bytes_other_seed_differs() -> None:
    a, b, c = (
        clips(24, frames=4, size=16, test=6, seed=5),
        clips(24, frames=4, size=16, test=6, seed=5),
        clips(24, frames=4, size=16, seed=6),
    )
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], c[0][0])
    (x0, y0), _ = clips(24, frames=4, size=16, test=0, seed=5)
    assert torch.equal(x0, a[0][0]) and torch.equal(y0, a[0][1])  # the held-out split does not change the training clips


def test_clips_shapes_dtypes_and_balanced_labels() -> None:
    (x, y), (xt, _) = clips(36, frames=5, size=16, channels=1, test=7)
    assert x.shape == (36, 1, 5, 16, 16) and xt.shape == (7, 1, 5, 16, 16)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and torch.isfinite(x).all()
    assert torch.bincount(y, minlength=len(CLIP_CLASSES)).tolist() == [3] * 12
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3  # standardised with the training clips


def test_each_shape_moves_the_way_its_class_says() -> None:
    """Where the frames change from one to the next follows the object: its drift over the clip is
    the class's direction (right, down, left, up in image coordinates)."""
    (x, y), _ = clips(48, frames=6, size=32, noise=0.0, seed=1)
    change = (x[:, :, 1:] - x[:, :, :-1]).abs().sum(1)  # (N, frames - 1, H, W)
    grid = torch.arange(32.0)
    weight = change.sum((2, 3)).clamp_min(1e-9)
    cols, rows = (change.sum(2) * grid).sum(2) / weight, (change.sum(3) * grid).sum(2) / weight
    dx, dy = cols[:, -1] - cols[:, 0], rows[:, -1] - rows[:, 0]
    found = torch.stack([dx, dy, -dx, -dy], dim=1).argmax(1)
    assert torch.equal(found, y % len(DIRECTIONS))


def test_load_data_clips_and_its_options() -> None:
    bundle = load_data("synthetic:clips", seed=2, n=8, test=4, frames=3, size=12)
    assert bundle.input_shape == (3, 3, 12, 12) and bundle.num_outputs == 12 and bundle.task == "classification"
    assert len(bundle) == 8 and bundle.test is not None and len(bundle.test) == 4  # type: ignore[arg-type]
    for options, message in (
        ({"frames": 1}, "frames must be an integer from 2"),
        ({"fps": 3}, "has no option 'fps'"),
        ({"n": 10**8}, "n must be"),
    ):
        with pytest.raises(DataError, match=message):
            load_data("synthetic:clips", **options)


def _series(path: Path, variant: str, section: str, quantity: str) -> np.ndarray:
    found = read_file(path).runs[variant].get(section, quantity)
    assert found is not None, f"{section}/{quantity} not recorded"
    return found


def _config(tmp_path: Path, data: str, options: str, variants: str) -> str:
    (tmp_path / "video.py").write_text(MODEL)
    return (
        f"name: video\nmodel: {tmp_path / 'video.py'}:make\ndata: {data}\ndata_options: {options}\nsteps: 4\nbatch_size: 4\n"
        f"{variants}\nprobes: {{moments: {{every: 2, per_channel: true}}, ics: {{every: 2}}, heldout: {{every: 2}}}}\n"
        f"output: {tmp_path / 'video.h5'}\n"
    )


def test_a_3d_conv_model_trains_on_clips_recording_moments_per_channel_and_ics(tmp_path: Path) -> None:
    run_experiment(load_config_text(_config(tmp_path, "synthetic:clips", "{n: 16, test: 4, frames: 4, size: 16}", "bn: keep"), "t"))
    run = read_file(tmp_path / "video.h5").runs["keep"]
    assert run.attrs["status"] == "finished" and np.isfinite(_series(tmp_path / "video.h5", "keep", "train", "loss")).all()
    assert "1" in run.per_channel_layers()  # the BatchNorm3d
    per_channel = np.asarray(run.data["moments/per_channel/1/mean"])
    assert per_channel.shape == (2, 4) and np.isfinite(per_channel).all()  # a column per channel of its (N, C, T, H, W) output
    ics = _series(tmp_path / "video.h5", "keep", "ics", "l2")
    assert len(ics) and np.isfinite(ics).all()
    assert len(_series(tmp_path / "video.h5", "keep", HELDOUT, "accuracy"))


def test_5d_npz_arrays_train_and_insert_puts_batchnorm3d_after_conv3d(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "clips.npz", x=rng.standard_normal((12, 3, 4, 8, 8)).astype(np.float32), y=rng.integers(0, 3, 12))
    text = _config(tmp_path, f"npz:{tmp_path / 'clips.npz'}", "{}", "model_options: {bn: false}\nbn: insert").replace(
        ", heldout: {every: 2}", ""
    )
    run_experiment(load_config_text(text, "t"))
    run = read_file(tmp_path / "video.h5").runs["insert"]
    assert run.attrs["status"] == "finished" and np.isfinite(_series(tmp_path / "video.h5", "insert", "train", "loss")).all()
    norm = next(layer for layer in run.layers if layer["name"] == "0_bn")
    assert norm["kind"] == "norm" and norm["output_shape"] == "4x4x4x8x8"  # a BatchNorm3d after the Conv3d, on 5-D activations


@pytest.mark.slow
def test_the_builtin_video_model_learns_clips_in_a_brief_run_with_and_without_batchnorm(tmp_path: Path) -> None:
    """Held-out accuracy near chance (1/12) at first, and well above it after 200 SGD steps, with
    BatchNorm3d inserted and without: a built-in set no short run learns compares nothing. (Before
    the max-pooled video_cnn, a small 3-D conv net that averaged over the clip stayed at chance.)"""
    text = (
        "name: learn\nmodel: video_cnn\ndata: synthetic:clips\ndata_options: {n: 1024, test: 256}\nsteps: 201\nbatch_size: 32\n"
        "lr: 0.02\nmomentum: 0.9\nvariants: {bn: [keep, insert]}\nprobes: {moments: {every: 100}, heldout: {every: 50}}\n"
        f"output: {tmp_path / 'learn.h5'}\n"
    )
    run_experiment(load_config_text(text, "t"))
    for variant in ("keep", "insert"):
        accuracy = _series(tmp_path / "learn.h5", variant, HELDOUT, "accuracy")
        assert accuracy[:2].max() < 0.2 and accuracy[-1] > 0.25, (variant, accuracy.round(3).tolist())
