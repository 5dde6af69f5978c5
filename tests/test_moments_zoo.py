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


def test_stratified_mean_and_error_by_hand() -> None:
    # 8 steps between records around 1.0 and 2 record steps of 3 and 5: weights 0.8 and 0.2
    between = [0.9, 1.1, 0.9, 1.1, 0.9, 1.1, 0.9, 1.1]
    times, recorded = [*between, 3.0, 5.0], [0.0] * 8 + [1.0, 1.0]
    mean, se = zoo.per_step(times, recorded)
    assert mean == pytest.approx(0.8 * 1.0 + 0.2 * 4.0)
    variance_between = sum((t - 1.0) ** 2 for t in between) / 7
    assert se == pytest.approx((0.8**2 * variance_between / 8 + 0.2**2 * 2.0 / 2) ** 0.5)  # variance of 3 and 5: 2
    plain_mean, plain_se = zoo.per_step(between, [0.0] * 8)
    assert plain_mean == pytest.approx(1.0) and plain_se == pytest.approx((variance_between / 8) ** 0.5)
