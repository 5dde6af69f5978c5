"""The held-out probe: eval-mode loss and accuracy on the data's held-out split, leaving no trace."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bnprobe.config import load_config_text
from bnprobe.experiment import run_experiment
from bnprobe.probes.heldout import evaluate
from bnprobe.store import HELDOUT, read_file


def test_evaluate_matches_a_hand_computation_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    model[1].eval()  # a module the user froze stays frozen
    x, y = torch.randn(10, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    stream = torch.get_rng_state()
    found = evaluate(model, nn.CrossEntropyLoss(), TensorDataset(x, y), batch_size=3)
    assert torch.equal(torch.get_rng_state(), stream)  # the loader's seed draw leaves no trace
    # the reference: the whole set at once, in eval mode (running statistics, no dropout)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        out = reference(x)
    assert math.isclose(float(found["loss"]), float(nn.functional.cross_entropy(out, y)), rel_tol=1e-6)
    assert found["accuracy"] == int((out.argmax(1) == y).sum()) / len(y)
    model_modes = [m.training for m in model.modules()]
    assert model_modes == [True, True, False, True, True]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())


def test_regression_has_no_accuracy() -> None:
    model = nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    found = evaluate(model, nn.MSELoss(), TensorDataset(x, y), batch_size=2)
    with torch.no_grad():
        assert math.isclose(float(found["loss"]), float(nn.functional.mse_loss(model(x), y)), rel_tol=1e-6)
    assert np.isnan(found["accuracy"])


def test_a_run_records_held_out_numbers_only_where_the_data_has_a_split(tmp_path: Path) -> None:
    text = "model: mlp\ndata: {data}\ndata_options: {options}\nsteps: 11\nbatch_size: 32\nprobes: {{moments: {{every: 5}}}}\n"
    cfg = load_config_text(
        text.format(data="synthetic:shapes", options="{n: 256, test: 64, size: 8, channels: 1}") + f"output: {tmp_path / 'a.h5'}\n", "t"
    )
    run_experiment(cfg)
    [run] = read_file(tmp_path / "a.h5").runs.values()
    assert run.get(HELDOUT, "step").tolist() == [0, 5, 10]
    loss, acc = run.get(HELDOUT, "loss"), run.get(HELDOUT, "accuracy")
    assert np.isfinite(loss).all() and ((acc >= 0) & (acc <= 1)).all()
    assert abs(loss[0] - math.log(10)) < 0.5  # an untrained net is near chance on 10 classes
    cfg = load_config_text(text.format(data="synthetic:mnist", options="{n: 256}") + f"output: {tmp_path / 'b.h5'}\n", "t")
    run_experiment(cfg)
    [run] = read_file(tmp_path / "b.h5").runs.values()
    assert not run.has(HELDOUT)
