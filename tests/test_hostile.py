"""Hostile inputs: each is one line on stderr (``bnprobe: error: ...``), exit code 2,
no traceback, and nothing written (no new file, every existing file byte-equal).

Each case is a set of files to lay out in an empty directory plus a command line. Most go through
typer's CliRunner; a few run ``python -m bnprobe.cli`` in a subprocess, where an escaping exception
would print a real traceback.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _fixtures import write_run_file
from typer.testing import CliRunner

from bnprobe.cli import app

runner = CliRunner()

TINY = (
    "name: tiny\nmodel: vgg\nmodel_options: {width: 0.125}\ndata: synthetic:cifar10\ndata_options: {n: 64}\n"
    "steps: 4\nbatch_size: 16\nlr: 0.05\nprobes: {moments: {every: 2}}\n"
)


def config(extra: str) -> dict[str, str]:
    """The tiny config with ``extra`` lines appended; a top-level key of ``extra`` replaces the tiny
    config's (a key given twice is an error of its own)."""
    given = {line.split(":", 1)[0] for line in extra.splitlines() if ":" in line and not line.startswith((" ", "-"))}
    kept = "".join(line + "\n" for line in TINY.splitlines() if line.split(":", 1)[0] not in given)
    return {"c.yaml": kept + extra + "\n"}


def bomb() -> str:
    """'Billion laughs': nine levels of nine aliases, 9**9 strings once expanded."""
    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return f"[{', '.join(levels)}]"


def run_file(path: Path) -> None:
    write_run_file(path, variants=("keep",), steps=6, record_every=2)


def broken(edit: Callable[[h5py.File], None]) -> Callable[[Path], None]:
    """A valid run file, then ``edit`` applied to it with h5py."""

    def make(path: Path) -> None:
        run_file(path)
        with h5py.File(path, "r+") as f:
            edit(f)

    return make


def _replace(f: h5py.File, name: str, data: object = np.arange(3)) -> None:
    del f[name]
    f.create_dataset(name, data=data)


def _h5_arrays(path: Path, **arrays: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f[key] = value


def _checkpoint(f: h5py.File, state: dict) -> None:
    """``state`` as the checkpoint of run ``keep``, and a config that builds quickly."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    f["runs/keep"].create_dataset("checkpoint", data=np.frombuffer(buffer.getvalue(), dtype=np.uint8)).attrs["step"] = 2
    f.attrs["config"] = TINY


def run_with_checkpoint(path: Path) -> None:
    """A finished run of the tiny config, with its checkpoint."""
    from bnprobe.config import load_config_text
    from bnprobe.experiment import run_experiment

    run_experiment(load_config_text(TINY, "TINY", {"output": str(path), "steps": 2}))


def truncated(path: Path) -> None:
    run_file(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flipped(offset: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        run_file(path)
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))

    return make


def npy_as_npz(path: Path) -> None:
    np.save(path.with_suffix(".npy"), np.zeros((8, 3)))
    path.with_suffix(".npy").rename(path)


def arrays(path: Path) -> None:
    np.savez(path, x=np.zeros((8, 3), dtype=np.float32), y=np.arange(8) % 2)


def image_folder(path: Path, sizes: tuple[int, ...] = (4, 4)) -> None:
    """Classes a, b, ...: one image each, of the given sizes (0: a file that is no image)."""
    from PIL import Image

    for cls, size in zip("abcdefgh", sizes):
        (path / cls).mkdir(parents=True)
        if size:
            Image.new("RGB", (size, size)).save(path / cls / "0.png")
        else:
            (path / cls / "0.png").write_text("not an image")


Setup = str | bytes | Callable[[Path], None]


@dataclass
class Case:
    id: str
    argv: list[str]
    files: dict[str, Setup] = field(default_factory=dict)


GOOD = {"run.h5": run_file}
CASES = [
    # --- YAML itself
    Case("alias-bomb-steps", ["train", "c.yaml"], config(f"steps: {bomb()}")),
    Case("alias-bomb-name", ["train", "c.yaml"], config(f"name: {bomb()}")),
    Case("alias-bomb-set", ["train", "c.yaml", "--set", f"probes.layers={bomb()}"], config("")),
    Case("alias-small", ["train", "c.yaml"], config("a: &x 3\nsteps: *x")),
    Case("deep-nesting", ["train", "c.yaml"], config("steps: " + "[" * 5000 + "]" * 5000)),
    Case("yaml-list", ["train", "c.yaml"], {"c.yaml": "- a\n- b\n"}),
    Case("yaml-binary", ["train", "c.yaml"], {"c.yaml": bytes(range(256))}),
    Case("yaml-nul", ["train", "c.yaml"], {"c.yaml": "name: a\x00b\n"}),
    Case("yaml-duplicate-key", ["train", "c.yaml"], {"c.yaml": TINY + "steps: 5\n"}),
    Case("yaml-duplicate-nested-key", ["train", "c.yaml", "--set", "data_options={n: 8, n: 16}"], config("")),
    Case("yaml-unhashable-key", ["train", "c.yaml"], config("probes: {[1]: 2}")),
    Case("huge-string-value", ["train", "c.yaml"], config("steps: " + "9" * 5000 + "x")),
    Case("int-too-long-to-parse", ["train", "c.yaml"], config("steps: " + "9" * 5000)),
    Case("bad-timestamp", ["train", "c.yaml"], config("name: 2020-13-45")),
    # --- types and ranges
    Case("seed-huge", ["train", "c.yaml"], config("seed: 99999999999999999999999")),
    Case("seed-2**64", ["train", "c.yaml"], config(f"seed: {2**64}")),
    Case("seed-negative", ["train", "c.yaml"], config("seed: -1")),
    Case("seed-string", ["train", "c.yaml"], config("seed: abc")),
    Case("steps-inf", ["train", "c.yaml"], config("steps: .inf")),
    Case("steps-huge", ["train", "c.yaml"], config(f"steps: {10**30}")),
    Case("flush-every-huge", ["train", "c.yaml"], config(f"flush_every: {2**70}")),
    Case("lr-nan", ["train", "c.yaml"], config("lr: .nan")),
    Case("momentum-inf", ["train", "c.yaml"], config("momentum: .inf")),
    Case("batch-size-1e9", ["train", "c.yaml"], config("batch_size: 1e9")),
    Case("batch-size-huge", ["train", "c.yaml"], config(f"batch_size: {2**40}")),
    Case("etas-negative", ["train", "c.yaml"], config("probes: {landscape: {etas: [-1]}}")),
    Case("record-every-0", ["train", "c.yaml"], config("probes: {moments: {every: 0}}")),
    Case("histogram-bins-huge", ["train", "c.yaml"], config("probes: {moments: {histogram_bins: 1000000000}}")),
    Case("histogram-range-inf", ["train", "c.yaml"], config("probes: {moments: {histogram_bins: 4, histogram_range: [0, .inf]}}")),
    Case("percentile-samples-negative", ["train", "c.yaml"], config("probes: {moments: {percentile_samples: -1}}")),
    Case("hessian-max-iter-0", ["train", "c.yaml"], config("probes: {hessian: {enabled: true, max_iter: 0}}")),
    Case("hessian-every-negative", ["train", "c.yaml"], config("probes: {hessian: {enabled: true, every: -1}}")),
    Case("landscape-every-negative", ["train", "c.yaml"], config("probes: {landscape: {enabled: true, every: -2}}")),
    Case("unknown-kind", ["train", "c.yaml"], config("probes: {kinds: [bogus]}")),
    Case("noise-loud", ["train", "c.yaml"], config("bn: noisy\nnoise: loud")),
    Case("noise-range-string", ["train", "c.yaml"], config("bn: noisy\nnoise: {mu_range: [a, b]}")),
    Case("variants-duplicate", ["train", "c.yaml"], config("variants: {lr: [0.1, 0.1]}")),
    Case("name-nul", ["train", "c.yaml"], config('name: "a\\0b"')),
    Case("name-too-long", ["train", "c.yaml"], config("name: " + "n" * 300)),
    Case("output-nul", ["train", "c.yaml"], config('output: "x\\0.h5"')),
    Case("output-attribute", ["train", "c.yaml"], config('output: "runs/{name.__class__}.h5"')),
    Case("output-index", ["train", "c.yaml"], config('output: "runs/{name[0]}.h5"')),
    Case("output-format-spec", ["train", "c.yaml"], config('output: "runs/{name:>999999999999}.h5"')),
    Case("device-cuda-x", ["train", "c.yaml"], config("device: cuda:x")),
    Case("device-cuda-negative", ["train", "c.yaml"], config("device: cuda:-1")),
    Case("device-cpu-abc", ["train", "c.yaml"], config("device: cpu:abc")),
    Case("device-flag", ["train", "c.yaml", "--device", "cuda:"], config("")),
    # --- data options
    Case("n-huge", ["train", "c.yaml"], config("data_options: {n: 1000000000000}")),
    Case("n-string", ["train", "c.yaml"], config("data_options: {n: many}")),
    Case("n-negative", ["train", "c.yaml"], config("data_options: {n: -5}")),
    Case("linear-n-negative", ["train", "c.yaml"], config("model: dln\ndata: synthetic:linear\ndata_options: {n: -5}")),
    Case("linear-dim-0", ["train", "c.yaml"], config("model: dln\ndata: synthetic:linear\ndata_options: {dim: 0}")),
    Case("num-classes-0", ["train", "c.yaml"], config("data_options: {n: 64, num_classes: 0}")),
    Case("data-noise-loud", ["train", "c.yaml"], config("data_options: {n: 64, noise: loud}")),
    Case("set-options-list", ["train", "c.yaml", "--set", "data_options=[1,2]"], config("")),
    Case("set-options-list-key", ["train", "c.yaml", "--set", "data_options={[1]: 2}"], config("")),
    Case("set-options-int-key", ["train", "c.yaml", "--set", "data_options={1: 2}"], config("")),
    Case("set-model-options-int-key", ["train", "c.yaml", "--set", "model_options={1: 2}"], config("")),
    Case("torchvision-fakedata", ["train", "c.yaml"], {**config("data: torchvision:FakeData:d\ndata_options: {}"), "d/.keep": ""}),
    Case(
        "torchvision-imagefolder",
        ["train", "c.yaml"],
        {**config("data: torchvision:ImageFolder:imgs\ndata_options: {}"), "imgs": image_folder},
    ),
    Case("npy-named-npz", ["train", "c.yaml"], {**config("data: npz:a.npz\ndata_options: {}"), "a.npz": npy_as_npz}),
    Case("x-key-list", ["train", "c.yaml"], {**config("data: npz:a.npz\ndata_options: {x_key: [x]}"), "a.npz": arrays}),
    Case(
        "image-size-string",
        ["train", "c.yaml"],
        {**config("data: imagefolder:imgs\ndata_options: {image_size: big}"), "imgs": image_folder},
    ),
    # --- model options
    Case("vgg-width-negative", ["train", "c.yaml"], config("model_options: {width: -1}")),
    Case(
        "dln-depth-negative",
        ["train", "c.yaml"],
        config("model: dln\ndata: synthetic:linear\ndata_options: {}\nmodel_options: {depth: -3}"),
    ),
    Case("mlp-hidden-0", ["train", "c.yaml"], config("model: mlp\ndata: synthetic:mnist\nmodel_options: {hidden: 0}")),
    Case("bn-batch-of-one", ["train", "c.yaml"], config("model: mlp\nmodel_options: {}\ndata: synthetic:mnist\nbn: insert\nbatch_size: 1")),
    Case("mlp-depth-negative", ["train", "c.yaml"], config("model: mlp\ndata: synthetic:mnist\nmodel_options: {depth: -1}")),
    # --- model specs
    Case("model-empty", ["train", "c.yaml"], config('model: ""')),
    Case("model-colon", ["train", "c.yaml"], config('model: ":"')),
    Case("model-file-no-factory", ["train", "c.yaml"], {**config('model: "m.py:"'), "m.py": "x = 1\n"}),
    Case(
        "model-not-a-module", ["train", "c.yaml"], {**config("model: m.py:make\nmodel_options: {}"), "m.py": "def make():\n    return 3\n"}
    ),
    Case(
        "model-wrong-outputs",
        ["train", "c.yaml"],
        {
            **config("model: m.py:make\nmodel_options: {}"),
            "m.py": "from torch import nn\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 3))\n",
        },
    ),
    Case(
        "model-returns-tuple",
        ["train", "c.yaml"],
        {
            **config("model: m.py:Two\nmodel_options: {}"),
            "m.py": "from torch import nn\nclass Two(nn.Module):\n    def __init__(self, num_classes):\n        super().__init__()\n        self.lin = nn.Linear(3072, num_classes)\n    def forward(self, x):\n        y = self.lin(x.flatten(1))\n        return y, y\n",
        },
    ),
    Case(
        "model-regression-shape",
        ["train", "c.yaml"],
        {
            **config("model: m.py:make\nmodel_options: {}\ndata: synthetic:linear\ndata_options: {}"),
            "m.py": "from torch import nn\ndef make():\n    return nn.Linear(10, 3)\n",
        },
    ),
    Case("model-huge-name", ["train", "c.yaml"], config("model: " + "v" * 5000)),
    Case(
        "model-weights-not-torch",
        ["train", "c.yaml"],
        {**config("model: torchvision:resnet18\nmodel_options: {weights_file: w.pt}"), "w.pt": "junk"},
    ),
    Case("inspect-huge-name", ["inspect", "x" * 5000], {}),
    # --- data files
    Case(
        "npz-empty",
        ["train", "c.yaml"],
        {**config("data: npz:a.npz\ndata_options: {}"), "a.npz": lambda p: np.savez(p, x=np.zeros((0, 3)), y=np.zeros(0, dtype=int))},
    ),
    Case(
        "npz-x-1d",
        ["train", "c.yaml"],
        {
            **config("model: mlp\nmodel_options: {}\ndata: npz:a.npz\ndata_options: {}\nbatch_size: 4"),
            "a.npz": lambda p: np.savez(p, x=np.zeros(8), y=np.arange(8) % 2),
        },
    ),
    Case(
        "npz-object",
        ["train", "c.yaml"],
        {**config("data: npz:a.npz\ndata_options: {}"), "a.npz": lambda p: np.savez(p, x=np.array([None] * 8), y=np.arange(8))},
    ),
    Case(
        "npz-truncated",
        ["train", "c.yaml"],
        {**config("data: npz:a.npz\ndata_options: {}"), "a.npz": lambda p: (arrays(p), p.write_bytes(p.read_bytes()[:100]))},
    ),
    Case(
        "h5-data-groups-only",
        ["train", "c.yaml"],
        {**config("data: h5:a.h5\ndata_options: {}"), "a.h5": lambda p: h5py.File(p, "w").create_group("x").file.close()},
    ),
    Case("h5-data-text", ["train", "c.yaml"], {**config("data: h5:a.h5\ndata_options: {}"), "a.h5": "text"}),
    Case(
        "h5-data-compound",
        ["train", "c.yaml"],
        {**config("data: h5:a.h5\ndata_options: {}"), "a.h5": lambda p: _h5_arrays(p, x=np.zeros(8, dtype=[("a", "f4")]), y=np.arange(8))},
    ),
    Case("imagefolder-empty", ["train", "c.yaml"], {**config("data: imagefolder:imgs\ndata_options: {}"), "imgs/a/.keep": ""}),
    Case(
        "imagefolder-broken-image",
        ["train", "c.yaml"],
        {**config("data: imagefolder:imgs\ndata_options: {}"), "imgs/a/0.png": "not a png", "imgs/b/0.png": "not a png"},
    ),
    Case(
        "imagefolder-sizes-differ",
        ["train", "c.yaml"],
        {**config("data: imagefolder:imgs\ndata_options: {}\nbatch_size: 2"), "imgs": lambda p: image_folder(p, (4, 5))},
    ),
    Case(
        "imagefolder-size-list3",
        ["train", "c.yaml"],
        {**config("data: imagefolder:imgs\ndata_options: {image_size: [1, 2, 3]}"), "imgs": image_folder},
    ),
    # --- more config
    Case("probes-layers-int", ["train", "c.yaml"], config("probes: {layers: [[1]]}")),
    Case("set-empty-key", ["train", "c.yaml", "--set", "=3"], config("")),
    Case("set-under-scalar", ["train", "c.yaml", "--set", "name.x=1"], config("")),
    Case("set-deep-unknown", ["train", "c.yaml", "--set", "a.b.c=1"], config("")),
    Case(
        "variants-huge-product",
        ["train", "c.yaml"],
        config(
            "variants: {lr: ["
            + ", ".join(str(0.01 * (i + 1)) for i in range(200))
            + "], momentum: ["
            + ", ".join(str(0.001 * i) for i in range(200))
            + "]}"
        ),
    ),
    Case("variants-list", ["train", "c.yaml"], config("variants: [1, 2]")),
    Case("variants-model-bad", ["train", "c.yaml"], config("variants: {model: [vgg, nope]}")),
    Case("output-empty", ["train", "c.yaml"], config('output: ""')),
    Case("output-dev-full", ["train", "c.yaml"], config("output: /proc/self/x.h5")),
    Case("config-h5", ["train", "x.h5"], {"x.h5": "x"}),
    Case("config-missing", ["train", "nope.yaml"], {}),
    Case("config-dir", ["train", "d"], {"d/.keep": ""}),
    # --- measure-ics / resume on files that are bnprobe files
    Case("measure-ics-steps-0", ["measure-ics", "run.h5", "--steps", "0", "-o", "o.h5"], GOOD),
    Case("measure-ics-no-checkpoint", ["measure-ics", "run.h5", "-o", "o.h5"], GOOD),
    Case("measure-ics-steps-string", ["measure-ics", "run.h5", "--set", "steps=abc", "-o", "o.h5"], GOOD),
    Case(
        "measure-ics-bad-checkpoint",
        ["measure-ics", "run.h5", "-o", "o.h5"],
        {"run.h5": broken(lambda f: f["runs/keep"].create_dataset("checkpoint", data=np.arange(10, dtype=np.uint8)))},
    ),
    Case(
        "resume-bomb-config",
        ["train", "--resume", "run.h5"],
        {"run.h5": broken(lambda f: f.attrs.__setitem__("config", f"name: {bomb()}"))},
    ),
    Case("resume-config-list", ["train", "--resume", "run.h5"], {"run.h5": broken(lambda f: f.attrs.__setitem__("config", "[1, 2]"))}),
    Case("resume-config-int", ["train", "--resume", "run.h5"], {"run.h5": broken(lambda f: f.attrs.__setitem__("config", 3))}),
    Case("noise-range-reversed", ["train", "c.yaml"], config("bn: noisy\nnoise: {sigma_range: [2, 1]}")),
    Case("noise-spread-negative", ["train", "c.yaml"], config("bn: noisy\nnoise: {mean_spread: -1, scale_std: -1}")),
    Case("torchvision-num-classes", ["train", "c.yaml"], config("model: torchvision:resnet18\nmodel_options: {num_classes: 5}")),
    Case("export-onto-input", ["export", "run.h5", "-o", "run.h5", "--force"], GOOD),
    Case("measure-ics-onto-input", ["measure-ics", "run.h5", "-o", "./run.h5", "--force"], {"run.h5": run_with_checkpoint}),
    Case("data-options-seed", ["train", "c.yaml"], config("data_options: {seed: 3}")),
    # --- names too long for the file system
    Case("long-config-path", ["train", "c" * 300 + ".yaml"], {}),
    Case("long-data-path", ["train", "c.yaml"], config("data: npz:" + "d" * 300 + ".npz\ndata_options: {}")),
    Case("long-image-folder", ["train", "c.yaml"], config("data: imagefolder:" + "d" * 300 + "\ndata_options: {}")),
    Case("long-torchvision-root", ["train", "c.yaml"], config("data: torchvision:CIFAR10:" + "d" * 300 + "\ndata_options: {}")),
    Case("long-model-path", ["train", "c.yaml"], config("model: " + "m" * 300 + ".py:make\nmodel_options: {}")),
    Case("long-weights-path", ["train", "c.yaml"], config("model: torchvision:resnet18\nmodel_options: {weights_file: " + "w" * 300 + "}")),
    Case("long-report-path", ["report", "r" * 300 + ".h5"], {}),
    Case("long-resume-path", ["train", "--resume", "r" * 300 + ".h5"], {}),
    Case("long-measure-path", ["measure-ics", "r" * 300 + ".h5"], {}),
    # --- checkpoints that do not fit
    Case("checkpoint-empty-dict", ["measure-ics", "run.h5", "-o", "o.h5"], {"run.h5": broken(lambda f: _checkpoint(f, {}))}),
    Case(
        "checkpoint-other-model",
        ["measure-ics", "run.h5", "-o", "o.h5"],
        {
            "run.h5": broken(
                lambda f: _checkpoint(
                    f,
                    {
                        "model": {"w": torch.zeros(2)},
                        "optimizer": {},
                        "next_step": 2,
                        "rng_cpu": torch.zeros(2, dtype=torch.uint8),
                        "rng_modules": {},
                    },
                )
            )
        },
    ),
    # --- report/export/plot options
    Case("report-bad-stat", ["report", "run.h5", "--stat", "bogus"], GOOD),
    Case("report-bad-variant", ["report", "run.h5", "--variant", "nope"], GOOD),
    Case("export-bad-format", ["export", "run.h5", "-f", "xls", "-o", "o.xls"], GOOD),
    Case("plot-bad-kind", ["plot", "run.h5", "-o", "f.png", "--kind", "nope"], GOOD),
    Case("plot-bad-layer", ["plot", "run.h5", "-o", "f.png", "--layer", "nope*"], GOOD),
    Case(
        "plot-ics-missing",
        ["plot", "run.h5", "-o", "f.png", "--kind", "ics"],
        {"run.h5": lambda p: write_run_file(p, variants=("keep",), sections=("train",), steps=4)},
    ),
    # --- resume / measure-ics on wrong files
    Case("resume-text", ["train", "--resume", "x.h5"], {"x.h5": "not hdf5"}),
    Case(
        "resume-format-newer", ["train", "--resume", "run.h5"], {"run.h5": broken(lambda f: f.attrs.__setitem__("format_version", "2.1"))}
    ),
    Case("resume-zero-bytes", ["train", "--resume", "x.h5"], {"x.h5": b""}),
    Case("resume-runs-dataset", ["train", "--resume", "run.h5"], {"run.h5": broken(lambda f: _replace(f, "runs"))}),
    Case("measure-ics-run-dataset", ["measure-ics", "run.h5", "-o", "out.h5"], {"run.h5": broken(lambda f: _replace(f, "runs/keep"))}),
    # --- export with a bad output
    Case("export-name-too-long", ["export", "run.h5", "-o", "e" * 300 + ".csv"], GOOD),
    Case("export-output-dir", ["export", "run.h5", "-o", "d"], {**GOOD, "d/.keep": ""}),
    Case("export-npz-to-stdout", ["export", "run.h5", "-f", "npz", "-o", "-"], GOOD),
    Case("plot-bad-suffix", ["plot", "run.h5", "-o", "fig.jpg2"], GOOD),
]

BAD_FILES: dict[str, Setup] = {
    "zero-bytes": b"",
    "text": "hello",
    "truncated": truncated,
    "flipped-200": flipped(200),
    "runs-dataset": broken(lambda f: _replace(f, "runs")),
    "run-dataset": broken(lambda f: _replace(f, "runs/keep")),
    "section-dataset": broken(lambda f: _replace(f, "runs/keep/moments")),
    "train-dataset": broken(lambda f: _replace(f, "runs/keep/train")),
    "step-2d": broken(lambda f: _replace(f, "runs/keep/train/step", np.zeros((2, 2)))),
    "layers-plain": broken(lambda f: _replace(f, "runs/keep/layers")),
    "layers-group": broken(lambda f: (f.__delitem__("runs/keep/layers"), f.create_group("runs/keep/layers"))),
    "strings-as-values": broken(lambda f: _replace(f, "runs/keep/train/loss", np.array([b"a"] * 6))),
    "moments-1d": broken(lambda f: _replace(f, "runs/keep/moments/mean", np.zeros(3, dtype=np.float32))),
    "format-version-newer": broken(lambda f: f.attrs.__setitem__("format_version", 999)),
    "format-version-text": broken(lambda f: f.attrs.__setitem__("format_version", "two")),
    "ics-1d": broken(lambda f: _replace(f, "runs/keep/ics/l2", np.zeros(3, dtype=np.float32))),
}
for kind, setup in BAD_FILES.items():
    CASES += [
        Case(f"report-{kind}", ["report", "bad.h5"], {"bad.h5": setup}),
        Case(f"export-{kind}", ["export", "bad.h5", "-o", "out.csv"], {"bad.h5": setup}),
        Case(f"plot-{kind}", ["plot", "bad.h5", "-o", "fig.png", "--kind", "training"], {"bad.h5": setup}),
    ]
CASES += [
    Case(f"{cmd}-directory", [cmd, "d", *extra], {"d/.keep": ""})
    for cmd, extra in (("report", []), ("export", ["-o", "o.csv"]), ("plot", ["-o", "f.png"]))
]


def user_model(body: str, spec: str = "m.py:make") -> dict[str, Setup]:
    """The tiny config training ``spec`` from ``m.py``, which holds ``body`` after torch's imports."""
    return {**config(f"model: {spec}\nmodel_options: {{}}"), "m.py": "import sys\nimport torch\nfrom torch import nn\n" + body}


class _Code:
    """Pickles as a call of ``print``: what a weights file with code holds (in protocol 4, torch
    warns about the protocol too)."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return print, ("ran code from a weights file",)


LINEAR = "nn.Sequential(nn.Flatten(), nn.Linear(3072, num_classes))"
CASES += [
    # --- the user's model or its factory cannot train, or ends the process
    Case("model-integer-logits", ["train", "c.yaml"], user_model(f"class M(nn.Module):\n    def __init__(self, num_classes):\n        super().__init__()\n        self.net = {LINEAR}\n    def forward(self, x):\n        return self.net(x).long()\n", "m.py:M")),
    Case("model-forward-no-grad", ["train", "c.yaml"], user_model(f"class M(nn.Module):\n    def __init__(self, num_classes):\n        super().__init__()\n        self.net = {LINEAR}\n    def forward(self, x):\n        with torch.no_grad():\n            return self.net(x)\n", "m.py:M")),
    Case("model-all-frozen", ["train", "c.yaml"], user_model(f"def make(num_classes):\n    return {LINEAR}.requires_grad_(False)\n")),
    Case("model-argparse-at-import", ["train", "c.yaml"], user_model("import argparse\nargparse.ArgumentParser().parse_args()\ndef make():\n    pass\n")),
    Case("model-factory-exits-message", ["train", "c.yaml"], user_model('def make():\n    sys.exit("no GPU found")\n')),
    Case(
        "model-weights-with-code",
        ["train", "c.yaml"],
        {**config("model: torchvision:resnet18\nmodel_options: {weights_file: w.pt}"), "w.pt": lambda p: p.write_bytes(pickle.dumps(_Code(), protocol=4))},
    ),
    Case(
        "npz-nan",
        ["train", "c.yaml"],
        {**config("data: npz:a.npz\ndata_options: {}"), "a.npz": lambda p: np.savez(p, x=np.full((8, 3), np.nan), y=np.arange(8) % 2)},
    ),
    Case(
        "variants-model-files-one-name",
        ["train", "c.yaml"],
        {**config("model_options: {}\nvariants: {model: [vgg, a/m.py:make, b/m.py:make]}"), "a/m.py": user_model(f"def make(num_classes):\n    return {LINEAR}\n")["m.py"], "b/m.py": user_model(f"def make(num_classes):\n    return {LINEAR}\n")["m.py"]},
    ),
    Case("model-factory-exits-3", ["train", "c.yaml"], user_model("def make():\n    sys.exit(3)\n")),
]  # fmt: skip


def lay_out(root: Path, files: dict[str, Setup]) -> None:
    for name, setup in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(setup, bytes):
            path.write_bytes(setup)
        elif isinstance(setup, str):
            path.write_text(setup)
        else:
            setup(path)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories); bytecode caches aside."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*")) if "__pycache__" not in p.parts
    }


def assert_one_line_error(code: int | None, stdout: str, stderr: str) -> None:
    assert "Traceback" not in stdout + stderr, stdout + stderr
    assert code == 2, stdout + stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnprobe: error: ") and len(lines[0]) > len("bnprobe: error: "), stderr
    assert len(lines[0]) <= 520, "the message embeds a huge value"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_one_line_and_writes_nothing(case: Case, in_tmp: Path) -> None:
    lay_out(in_tmp, case.files)
    before = snapshot(in_tmp)
    result = runner.invoke(app, case.argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        pytest.fail(f"escaped: {type(result.exception).__name__}: {str(result.exception)[:300]}")
    assert_one_line_error(result.exit_code, result.stdout, result.stderr)
    assert snapshot(in_tmp) == before


SUBPROCESS = {
    c.id: c for c in CASES if c.id in ("alias-bomb-steps", "n-huge", "device-cuda-x", "torchvision-fakedata", "report-runs-dataset")
}
SUBPROCESS |= {c.id: c for c in CASES if c.id in ("model-argparse-at-import", "model-weights-with-code")}
SUBPROCESS["non-utf8-path"] = Case("non-utf8-path", ["train", os.fsdecode(b"\xff\xfe.yaml")], {})
SUBPROCESS["seed-flag-huge"] = Case("seed-flag-huge", ["train", "c.yaml", "--seed", str(2**64)], config(""))


@pytest.mark.parametrize("case", SUBPROCESS.values(), ids=list(SUBPROCESS))
def test_hostile_input_in_a_real_process(case: Case, in_tmp: Path) -> None:
    lay_out(in_tmp, case.files)
    before = snapshot(in_tmp)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "BNPROBE_DEBUG": "0"}
    argv = [os.fsencode(a) for a in case.argv]
    proc = subprocess.run(
        [sys.executable, "-m", "bnprobe.cli", *argv], cwd=in_tmp, env=env, capture_output=True, text=True, errors="replace", timeout=120
    )
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr)
    assert snapshot(in_tmp) == before


FRAGILE = """
from pathlib import Path
import torch
from torch import nn
class Fragile(nn.Module):
    def __init__(self, fail):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.fail = fail
        self.calls = 0
    def forward(self, x):
        self.calls += torch.is_grad_enabled()  # training steps, after bnprobe's one check with gradients (that the output reaches a parameter)
        if self.fail and self.calls > 3:
            raise {exc}("{msg}")
        return self.lin(x)
def make(num_classes):
    first = not Path("built").exists()  # only the first variant's model fails (the file is loaded anew per model)
    Path("built").touch()
    return nn.Sequential(nn.Flatten(), Fragile(fail=first), nn.Linear(4, num_classes))
"""


@pytest.mark.parametrize(
    ("exc", "msg"),
    [("RuntimeError", "boom"), ("MemoryError", "boom"), ("RuntimeError", "the camera connection timed out")],  # not a torchrun peer
)
def test_a_model_failing_mid_run_fails_its_variant_only(exc: str, msg: str, in_tmp: Path) -> None:
    (in_tmp / "fragile.py").write_text(FRAGILE.replace("{exc}", exc).replace("{msg}", msg))
    (in_tmp / "c.yaml").write_text(
        "name: f\nmodel: fragile.py:make\ndata: synthetic:linear\ndata_options: {n: 64, dim: 4}\n"
        "steps: 5\nbatch_size: 16\nprobes: {moments: {every: 1}}\nvariants: {lr: [0.1, 0.05]}\n"
    )
    result = runner.invoke(app, ["train", "c.yaml"])
    assert "Traceback" not in result.output and result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("bnprobe: error:")]
    assert errors == [
        f"bnprobe: error: variant lr0.1 failed: the model raised at step 2 in module '1' (Fragile): {exc}: {msg}; its records up to then are kept"
    ]
    assert result.stderr.splitlines()[-1] == errors[0]
    assert "failed @ 2" in result.stdout
    with h5py.File(in_tmp / "runs" / "f.h5") as f:
        failed, other = f["runs/lr0.1"], f["runs/lr0.05"]
        assert (failed.attrs["status"], failed.attrs["failed_step"], failed.attrs["steps"]) == ("failed", 2, 2)
        assert "in module '1'" in failed.attrs["error"]
        assert list(failed["train/step"][()]) == [0, 1] and list(failed["moments/step"][()]) == [0, 1]
        assert other.attrs["status"] == "finished" and list(other["train/step"][()]) == list(range(5))
    report = runner.invoke(app, ["report", "runs/f.h5"])
    assert report.exit_code == 0 and "lr0.1: failed: the model raised at step 2" in " ".join(report.stdout.split())


def test_unreadable_data_mid_run_fails_the_variant(in_tmp: Path) -> None:
    image_folder(in_tmp / "imgs", (4, 4, 4, 0))  # the fourth image is no image: read at step 1
    (in_tmp / "c.yaml").write_text(config("data: imagefolder:imgs\ndata_options: {}\nbatch_size: 2")["c.yaml"])
    result = runner.invoke(app, ["train", "c.yaml"])
    assert "Traceback" not in result.output and result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1] == (
        "bnprobe: error: variant keep failed: reading the data for step 1 failed: cannot read imgs/d/0.png: "
        "not an image file PIL can identify; its records up to then are kept"
    )
    with h5py.File(in_tmp / "runs" / "tiny.h5") as f:
        assert (f["runs/keep"].attrs["status"], list(f["runs/keep/train/step"][()])) == ("failed", [0])


def test_attributes_that_are_not_utf8_are_shown_replaced(tmp_path: Path) -> None:
    """h5py hands undecodable attribute bytes over as lone surrogates, which no console prints."""
    broken(lambda f: f["runs/keep"].attrs.update({"device": b"cp\xff", "model": np.bytes_(b"ml\xffp")}))(tmp_path / "run.h5")
    result = runner.invoke(app, ["report", str(tmp_path / "run.h5")])
    assert result.exit_code == 0, result.output
    assert "cp\ufffd" in result.stdout and "ml\ufffdp" in result.stdout
