"""Shared test material.

``write_run_file`` lays out small bnprobe files as the trainer does (the layout of docs/hdf5-format.md) with random
but deterministic numbers, for the report/export/plot tests, which read them back with h5py and
compare. ``Noisy`` is a module with its own random stream, for the probes' replay tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnprobe.layers import LayerInfo
from bnprobe.probes.moments import STATS
from bnprobe.store import RunData, RunWriter, Store, read_file

ALL_SECTIONS = ("train", "moments", "ics", "landscape", "hessian")
ETAS = np.array([0.05, 0.1, 0.2, 0.4], dtype=np.float64)


def layers_for(bn: str, surgery_names: bool = False) -> list[LayerInfo]:
    """An MLP: fc1..fc3 and an output layer; with BN a norm layer after each hidden one.

    ``surgery_names``: name them as BN surgery does when it wraps a layer (``fc1.linear``, ``fc1.bn``).
    """
    names: list[tuple[str, str, int]] = []
    for i in range(1, 4):
        with_bn = bn in ("insert", "noisy")
        names.append((f"fc{i}.linear" if with_bn and surgery_names else f"fc{i}", "linear", 16))
        if with_bn:
            names.append((f"fc{i}.bn" if surgery_names else f"bn{i}", "norm", 16))
    names.append(("out", "linear", 10))
    return [LayerInfo(n, k, 17 * w, (8, w), i) for i, (n, k, w) in enumerate(names)]


def write_run_file(
    path: Path,
    variants: Sequence[str] = ("keep", "insert", "noisy"),
    sections: Sequence[str] = ALL_SECTIONS,
    status: str | None = "finished",
    steps: int = 40,
    record_every: int = 5,
    per_channel: bool = False,
    histogram_bins: int = 0,
    seed: int = 0,
    regression: bool = False,
    surgery_names: bool = False,
    hessian_blocks: bool = False,
    spectrum: bool = False,
) -> Path:
    """A bnprobe file with one run per variant; ``status=None`` leaves ``running`` (a crashed run)."""
    rng = np.random.default_rng(seed)
    store = Store.create(path, "name: test\n")
    for v_index, variant in enumerate(variants):
        writer = store.run(variant, {"bn": variant, "model": "mlp", "data": "synthetic:mnist", "seed": seed, "device": "cpu"})
        layers = layers_for(variant, surgery_names)
        writer.set_layers(layers)
        n_layers = len(layers)
        drift = 0.0 if variant != "keep" else 0.05
        if "landscape" in sections:
            writer.write_constant("landscape/eta", ETAS)
        block_rng = np.random.default_rng(seed + 99)  # its own stream: the other numbers stay as they were
        block_names = [lay.name for lay in layers if lay.kind == "linear"]
        if "hessian" in sections and hessian_blocks:
            writer.write_constant("hessian/block", np.array(block_names, dtype=object))
        if "ics" in sections:
            ics_names = [lay.name for lay in layers if lay.kind == "linear"]
            writer.write_constant("ics/layer", np.array(ics_names, dtype=object))
        for step in range(steps):
            if "train" in sections:
                writer.append(
                    "train",
                    step,
                    {
                        "loss": 2.3 * np.exp(-step / 20) + 0.1 * v_index + 0.01 * rng.random(),
                        "accuracy": np.nan if regression else min(1.0, 0.1 + step / steps),
                        "lr": 0.1,
                        "seconds": 0.01 * (step + 1),
                    },
                )
            if step % record_every:
                continue
            if "moments" in sections:
                base = rng.normal(size=(len(STATS), n_layers)).astype(np.float32)
                base[0] += drift * step  # mean drifts without BN
                base[1] = np.abs(base[1]) + 0.5  # var > 0
                base[7:10] = np.sort(base[7:10], axis=0)  # p15 <= p50 <= p85
                values = {s: base[i] for i, s in enumerate(STATS)}
                if histogram_bins:
                    values["histogram"] = rng.integers(0, 50, size=(n_layers, histogram_bins)).astype(np.float32)
                writer.append("moments", step, values)
                if per_channel:
                    for layer in layers[:2]:
                        ch = rng.normal(size=(len(STATS), layer.output_shape[1])).astype(np.float32)
                        writer.append(f"moments/per_channel/{layer.name}", step, {s: ch[i] for i, s in enumerate(STATS)})
            if "ics" in sections:
                k = len(ics_names)
                writer.append(
                    "ics",
                    step,
                    {
                        "l2": rng.random(k).astype(np.float32) * (1 + v_index),
                        "cosine": (1 - 0.3 * v_index * rng.random(k)).astype(np.float32),
                        "grad_norm": rng.random(k).astype(np.float32) + 1,
                        "grad_norm_shifted": rng.random(k).astype(np.float32) + 1,
                        "rel_diff": rng.random(k).astype(np.float32),
                    },
                )
            if "landscape" in sections:
                loss = 2.0 * np.exp(-step / 30) + rng.random(len(ETAS)) * (0.5 if variant == "keep" else 0.1)
                writer.append(
                    "landscape",
                    step,
                    {
                        "loss": loss,
                        "grad_l2": rng.random(len(ETAS)) * (2 if variant == "keep" else 0.5),
                        "beta_smoothness": rng.random() * 10,
                        "loss_at_w": 2.0 * np.exp(-step / 30),
                    },
                )
            if "hessian" in sections:
                row = {"top_eigenvalue": 50 * rng.random(), "iterations": int(rng.integers(3, 20)), "residual": 1e-4 * rng.random()}
                row["converged"] = row["iterations"] < 19  # as if max_iter were 19
                if hessian_blocks:
                    k = len(block_names)
                    row |= {
                        "block_top_eigenvalue": 20 * block_rng.random(k),
                        "block_iterations": block_rng.integers(3, 20, k).astype(np.float64),
                        "block_residual": 1e-4 * block_rng.random(k),
                    }
                writer.append("hessian", step, row)
        if spectrum:
            _write_spectrum(writer, block_names, steps, record_every, np.random.default_rng(seed + 7 + v_index))
        if "hessian" in sections:
            writer.flush()
            writer._group["hessian/top_eigenvalue"].attrs.update({"bn_mode": "train", "samples": 128})
        if histogram_bins:
            writer.set_attrs(histogram_range=[-10.0, 10.0], histogram_bins=histogram_bins)
        if status is not None:
            writer.set_status(status, steps=steps, seconds=0.01 * steps, **({"diverged_step": steps - 1} if status == "diverged" else {}))
    if status is None:
        for writer in store.writers.values():
            writer.flush()
        store.flush()
        store._h5.close()  # leave statuses at "running", as a killed process would
    else:
        store.close()
    return path


def _write_spectrum(writer: RunWriter, blocks: list[str], steps: int, every: int, rng: np.random.Generator) -> None:
    """Spectrum records shaped as SpectrumProbe writes them: top-3, trace, SLQ (2 probes x 4 nodes), blocks."""
    writer.write_constant("spectrum/block", np.array(blocks, dtype=object))
    for step in range(0, steps, every):
        nodes = np.sort(rng.normal(size=(2, 4)) * 10, axis=1)
        writer.append(
            "spectrum",
            step,
            {
                "top_k": np.sort(50 * rng.random(3))[::-1],
                "top_k_residual": 1e-4 * rng.random(3),
                "iterations": 12,
                "converged": True,
                "trace": 100 * rng.random(),
                "trace_stderr": rng.random(),
                "density_nodes": nodes,
                "density_weights": np.full((2, 4), 0.25),
                "block_top_eigenvalue": 20 * rng.random(len(blocks)),
                "block_trace": 30 * rng.random(len(blocks)),
            },
        )
    writer.flush()
    writer._group["spectrum/top_k"].attrs.update({"bn_mode": "train", "samples": 64})


class Noisy(nn.Module):
    """Noisy-BN-like: per-channel random scale and shift from its own generator, in train mode."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        s = 1 + 0.25 * torch.randn(x.shape[1], generator=self.generator)
        m = 0.5 * torch.rand(x.shape[1], generator=self.generator)
        return x * s + m


def save_arrays(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Arrays ``x`` and ``y`` as the ``npz:`` or ``h5:`` data loaders read them, by ``path``'s suffix."""
    if path.suffix == ".npz":
        np.savez(path, x=x, y=y)
        return
    import h5py

    with h5py.File(path, "w") as f:
        f["x"], f["y"] = x, y


SEGMENTER = (
    "import torch.nn as nn\n\ndef make(num_classes):\n"
    "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, num_classes, 1))\n"
)


def train_segmenter(tmp_path: Path, data: str, batch_size: int) -> RunData:
    """A small per-pixel classifier trained 2 steps on ``data`` (moments every step), as read back."""
    from bnprobe.config import load_config_text
    from bnprobe.experiment import run_experiment

    (tmp_path / "seg.py").write_text(SEGMENTER)
    text = (
        f"name: seg\nmodel: {tmp_path / 'seg.py'}:make\ndata: {data}\nsteps: 2\nbatch_size: {batch_size}\n"
        f"probes: {{moments: {{every: 1}}}}\noutput: {tmp_path / 'seg'}.h5\n"
    )
    run_experiment(load_config_text(text, "t"))
    (run,) = read_file(tmp_path / "seg.h5").runs.values()
    return run


class ConvBnReluNet(nn.Module):
    """conv, bn, relu and a linear head: ``qat_conv_bn()`` fuses the first three."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.fc(self.relu(self.bn(self.conv(x))).mean((2, 3)))
        return y


def qat_conv_bn() -> nn.Module:
    """``conv`` as torch.ao's QAT ``ConvBnReLU2d``: a Conv2d holding ``conv.bn``, whose forward scales
    its own weight by ``bn.weight / sqrt(bn.running_var + eps)`` and then calls ``bn`` on the result."""
    import torch.ao.quantization as quant

    torch.manual_seed(0)
    model = ConvBnReluNet().train()
    model.qconfig = quant.get_default_qat_qconfig("x86")
    prepared: nn.Module = quant.prepare_qat(quant.fuse_modules_qat(model, [["conv", "bn", "relu"]]))
    return prepared
