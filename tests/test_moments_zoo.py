"""The ratios and the per-layer cost ``benchmarks/moments_zoo.py`` reports."""

from __future__ import annotations

import pytest
from _benchmarks import load_benchmark

zoo = load_benchmark("moments_zoo")


def test_ratio_and_its_error_by_hand() -> None:
    # 3.0 / 2.0, with relative errors 0.3 / 3 and 0.2 / 2 (0.1 each): 1.5 * sqrt(0.02)
    result = {"mean": {"plain": 2.0, "every step": 3.0}, "se": {"plain": 0.2, "every step": 0.3}}
    assert zoo.ratio(result, "every step") == pytest.approx((1.5, 1.5 * 0.02**0.5))


def test_marginal_cost_per_layer_of_the_deep_linear_nets() -> None:
    def net(layers: int, plain: float, every: float) -> dict[str, object]:
        return {"layers": layers, "CPU": {"mean": {"plain": plain, "every step": every}}}

    results = {"dln 25": net(25, 0.010, 0.012), "dln 200": net(200, 0.080, 0.0835), "resnet18": net(41, 1.0, 2.0)}
    (_, line) = zoo.marginal(results, "CPU")
    assert "adds 9 µs" in line and "(25 to 200 layers)" in line  # (0.0035 - 0.002) / 175 s
    assert zoo.marginal({"dln 25": results["dln 25"]}, "CPU") == []
