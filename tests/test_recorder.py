"""The Recorder API in a user's own loop writes what moment_stats computes, in forward order."""

from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import qat_conv_bn
from torch import nn

from bnprobe import Recorder
from bnprobe.passes import leave_no_trace
from bnprobe.probes.moments import STATS, moment_stats
from bnprobe.store import read_file


class TwoCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(4, 2)
        self.inner = nn.Linear(4, 4)
        self.first = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(torch.relu(self.first(x)))
        return self.out(self.inner(h))  # inner runs twice: its first call is recorded


def test_user_loop_records_moments_in_forward_order(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TwoCalls()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = [torch.randn(8, 3) for _ in range(5)]
    expected = {}
    with Recorder(model, tmp_path / "r.h5", record_every=2, percentile_samples=10**6) as rec:
        for step, x in enumerate(xs):
            seen = {}
            hooks = [
                m.register_forward_hook(lambda m, i, o, n=n, seen=seen: None if n in seen else seen.update({n: o.detach().clone()}))
                for n, m in model.named_children()
            ]
            loss = model(x).pow(2).mean()
            for h in hooks:
                h.remove()
            expected[step] = seen
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    run = read_file(tmp_path / "r.h5").runs["run"]
    assert run.layer_names == ["first", "inner", "out"]
    assert list(run.data["moments/step"]) == [0, 2, 4]
    assert run.attrs["status"] == "finished"
    for r, step in enumerate([0, 2, 4]):
        for j, name in enumerate(run.layer_names):
            ref = moment_stats(expected[step][name], samples=10**6)
            for i, stat in enumerate(STATS):
                assert run.data[f"moments/{stat}"][r, j] == pytest.approx(ref[i].item(), rel=1e-5, abs=1e-6)
    assert len(run.data["train/loss"]) == 5 and np.isnan(run.data["train/accuracy"]).all()


def test_inplace_relu_after_layer_does_not_corrupt_stats(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(inplace=True), nn.Linear(16, 1))
    x = torch.randn(32, 3)
    with Recorder(model, tmp_path / "r.h5", record_every=1) as rec:
        model(x)
        rec.step()
    pre = model[0](x)
    run = read_file(tmp_path / "r.h5").runs["run"]
    assert run.data["moments/min"][0, 0] == pytest.approx(pre.min().item(), rel=1e-6)  # negative: the pre-activation
    assert run.data["moments/min"][0, 0] < 0


def test_measurement_and_eval_passes_are_not_recorded(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4))
    with Recorder(model, tmp_path / "r.h5", record_every=1) as rec:
        with leave_no_trace(model):
            model(torch.full((2, 3), 100.0))
        model.eval()
        model(torch.full((2, 3), 100.0))
        model.train()
        x = torch.randn(4, 3)
        model(x)
        rec.step()
    run = read_file(tmp_path / "r.h5").runs["run"]
    assert run.data["moments/mean"][0, 0] == pytest.approx(model[0](x).mean().item(), rel=1e-5)


def test_per_channel_and_histogram(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3))
    x = torch.randn(4, 1, 6, 6)
    with Recorder(
        model, tmp_path / "r.h5", record_every=1, per_channel=True, histogram_bins=5, histogram_range=(-2.0, 2.0), percentile_samples=10**6
    ) as rec:
        model(x)
        rec.step()
    run = read_file(tmp_path / "r.h5").runs["run"]
    out = model(x).detach()
    got = run.data["moments/per_channel/0/var"][0]
    np.testing.assert_allclose(got, out.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=False).numpy(), rtol=1e-5)
    hist = run.data["moments/histogram"][0, 0]
    ref, _ = np.histogram(np.clip(out.numpy(), -2, 2), bins=5, range=(-2, 2))
    np.testing.assert_array_equal(hist, ref)


def test_an_exception_in_the_users_loop_marks_the_run_interrupted(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="the user's loop failed"), Recorder(model, tmp_path / "r.h5", record_every=1) as rec:
        model(torch.randn(4, 3))
        rec.step(loss=1.0)
        raise RuntimeError("the user's loop failed")
    run = read_file(tmp_path / "r.h5").runs["run"]
    assert run.attrs["status"] == "interrupted" and run.data["train/loss"].tolist() == [1.0]


class SometimesBranch(nn.Module):
    """``branch`` runs on even calls only (a skipped block, as stochastic depth or a conditional does)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.branch = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.stem(x)
        return self.branch(h) if self.calls % 2 == 1 else h


def test_a_layer_skipped_on_a_step_gets_nan_and_the_others_keep_their_records(tmp_path: Path) -> None:
    model = SometimesBranch()
    xs = [torch.randn(8, 3) for _ in range(4)]
    with Recorder(model, tmp_path / "r.h5", record_every=1, histogram_bins=4, percentile_samples=10**6) as rec:
        for x in xs:
            model(x)
            rec.step()
    run = read_file(tmp_path / "r.h5").runs["run"]
    assert run.layer_names == ["stem", "branch"]
    assert list(run.data["moments/step"]) == [0, 1, 2, 3]
    means = run.data["moments/mean"]
    for step, x in enumerate(xs):
        assert means[step, 0] == pytest.approx(model.stem(x).mean().item(), rel=1e-5, abs=1e-6)
    assert np.isfinite(means[[0, 2], 1]).all() and np.isnan(means[[1, 3], 1]).all()
    assert (run.data["moments/histogram"][[1, 3], 1] == 0).all() and run.data["moments/histogram"][0, 1].sum() == 8 * 4


@pytest.mark.parametrize("per_channel", [False, True])
def test_an_empty_activation_has_nan_statistics(per_channel: bool) -> None:
    stats = moment_stats(torch.empty(0, 3, 2), per_channel=per_channel)
    assert stats.shape == ((len(STATS), 3) if per_channel else (len(STATS),))
    assert torch.isnan(stats).all()


def test_steps_between_records_leave_the_model_without_hooks(tmp_path: Path) -> None:
    """A module with no hooks runs torch's fast path: the Recorder's hooks are on the layers for
    record steps' forwards only, and gone when it closes."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    hooked = []
    with Recorder(model, tmp_path / "r.h5", record_every=3) as rec:
        for _ in range(7):
            hooked.append(all(len(m._forward_hooks) > 0 for m in model))
            model(torch.randn(5, 3))
            rec.step()
    assert hooked == [True, False, False, True, False, False, True]
    assert not any(m._forward_hooks for m in model)
    assert list(read_file(tmp_path / "r.h5").runs["run"].data["moments/step"]) == [0, 3, 6]


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
def test_layers_table_follows_the_data_flow_of_nested_layers(tmp_path: Path) -> None:
    """A QAT conv runs its BN inside its forward, after using its own weight: conv first, though the
    BN's hook fires first; and after the first record, the model keeps no hook of the Recorder's."""
    model = qat_conv_bn()
    with Recorder(model, tmp_path / "r.h5", record_every=2) as rec:
        for _ in range(2):
            model(torch.randn(4, 3, 6, 6))
            rec.step()
        assert not model._forward_hooks and not model._forward_pre_hooks
    assert read_file(tmp_path / "r.h5").runs["run"].layer_names == ["conv", "conv.bn", "fc"]


class TokenAndBlock(nn.Module):
    """A root with a parameter of its own (a ViT's class token) around a holder that holds another."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(4))
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.block.register_parameter("scale", nn.Parameter(torch.ones(4)))  # a holder holding a holder
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x + self.token) * self.block.scale)


def test_a_root_with_parameters_of_its_own_records_in_data_flow_order(tmp_path: Path) -> None:
    """The order is watched from the root's own call on, which had begun: the end of that call
    emptied the watcher's stack of running layers (pop from an empty list on every timm ViT)."""
    model = TokenAndBlock()
    with Recorder(model, tmp_path / "r.h5", record_every=1) as rec:
        for _ in range(2):
            model(torch.randn(3, 4)).sum().backward()
            rec.step()
    assert read_file(tmp_path / "r.h5").runs["run"].layer_names == ["block.0", "block", "head", ""]
