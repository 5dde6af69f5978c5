from pathlib import Path

import pytest
import torch

# One thread: the tests use tiny tensors, and two threads stall badly when the machine is busy.
torch.set_num_threads(1)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside an empty directory (the default output is relative: runs/...)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """A config that trains an eighth-width VGG for a few steps, in about a second."""
    p = tmp_path / "tiny.yaml"
    p.write_text(
        "name: tiny\nmodel: vgg\nmodel_options: {width: 0.125}\ndata: synthetic:cifar10\ndata_options: {n: 128}\n"
        "steps: 6\nbatch_size: 16\nlr: 0.05\nprobes: {moments: {every: 2}}\n"
    )
    return p
