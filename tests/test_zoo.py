"""Every torchvision classification and segmentation model, the BatchNorm3d video models and a fixed timm
sample through every bnprobe check.

Opt-in, it takes long: ``pytest -m zoo`` (add ``-k resnet`` to narrow). The default run collects one
skipped placeholder. The checks are those of ``benchmarks/model_zoo.py`` (its docstring lists them);
a check may refuse with a one-line bnprobe error (a model that genuinely cannot do it), never fail.
"""

from __future__ import annotations

import pytest
import torch
from _benchmarks import load_benchmark

zoo = load_benchmark("model_zoo")


def _zoo_selected(config: pytest.Config) -> bool:
    expression = str(config.getoption("markexpr") or "")
    return "zoo" in expression and "not zoo" not in expression


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise over the zoo only when ``-m zoo`` asks for it: collecting it costs nothing otherwise."""
    if "case" in metafunc.fixturenames:
        cases = zoo.cases() if _zoo_selected(metafunc.config) else []
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.mark.zoo
def test_model(case: zoo.Case) -> None:
    torch.set_num_threads(1)
    row = zoo.check_model(case)
    failed = {check: str(cell) for check, cell in row.items() if cell.status == "FAIL"}
    assert not failed, failed
    assert set(row) == set(zoo.CHECKS)
    for check, cell in row.items():
        assert cell.status == "ok" or "\n" not in cell.note, f"{check}: a refusal is one line"
