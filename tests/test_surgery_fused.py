"""BN surgery on layers that run a BN inside their own forward: torch.ao's QAT-fused conv-BN, a custom conv."""

from __future__ import annotations

import pytest
import torch
from _fixtures import qat_conv_bn as qat_net
from torch import nn

from bnprobe.surgery import Action, NoisyBatchNorm2d, apply_bn

# torch.ao.quantization says it moves to torchao; its QAT modules are what these tests need
pytestmark = pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")

IMAGES = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


class ConvThenBn(nn.Conv2d):
    """A conv that runs its own BN child on its output, without reading the BN's tensors."""

    def __init__(self) -> None:
        super().__init__(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.bn(super().forward(x))
        return y


class CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = ConvThenBn(), nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.fc(self.conv(x).relu().mean((2, 3)))
        return y


def runs_forward_and_backward(model: nn.Module) -> None:
    model.train()(IMAGES).sum().backward()
    model.eval()(IMAGES)


@pytest.mark.parametrize("make", [qat_net, CustomNet])
def test_insert_keeps_a_layer_that_runs_a_bn_itself(make: type[nn.Module]) -> None:
    """Insert wrapped the conv in WithBatchNorm(conv, bn), whose new ``bn`` clashed with the conv's own
    (KeyError "attribute 'bn' already exists"), and would have normalised twice."""
    model, plan = apply_bn(make(), "insert", IMAGES)
    assert [(c.action, c.module, c.related) for c in plan.changes] == [(Action.KEPT, "conv.bn", "conv")]
    assert plan.changes[0].detail == "already runs a BatchNorm in its own forward (conv.bn)"
    runs_forward_and_backward(model)


@pytest.mark.parametrize("fold", [False, True])
def test_strip_keeps_a_bn_whose_tensors_a_fused_conv_reads_and_says_which(fold: bool) -> None:
    """Strip put an Identity where the QAT conv reads ``bn.running_var`` ('Identity' object has no
    attribute 'running_var') while the plan said "removed"; fold said "fed by several inputs ()"."""
    model, plan = apply_bn(qat_net(), "strip", IMAGES, fold=fold)
    not_done = "not folded or stripped" if fold else "not stripped"
    assert [(c.action, c.module, c.detail) for c in plan.changes] == [
        (Action.KEPT, "conv.bn", f"{not_done}: code other than its own forward reads its tensors: conv's forward (ConvBnReLU2d)")
    ]
    runs_forward_and_backward(model)


def test_fold_of_a_bn_run_inside_a_conv_says_why_not() -> None:
    """The BN's input is made inside the conv's forward, which the dataflow keeps whole: it is stripped
    (the model runs) and the reason names that conv, not "fed by several inputs ()"."""
    model, plan = apply_bn(CustomNet(), "strip", IMAGES, fold=True)
    assert [(c.action, c.module, c.detail) for c in plan.changes] == [
        (Action.REMOVED, "conv.bn", "not folded: it runs inside conv's forward, whose dataflow is not traced; nothing re-biased")
    ]
    runs_forward_and_backward(model)


def test_noisy_bn_inside_a_qat_conv_adds_its_noise_after_the_normalisation() -> None:
    """The QAT conv reads the BN's weight and statistics, which noisy BN leaves as they are; the noise
    comes from the BN's own forward, which the conv calls."""
    model, plan = apply_bn(qat_net(), "noisy", IMAGES)
    assert [(c.action, c.module) for c in plan.changes] == [(Action.NOISE, "conv.bn")]
    assert isinstance(model.get_submodule("conv.bn"), NoisyBatchNorm2d)
    runs_forward_and_backward(model)
