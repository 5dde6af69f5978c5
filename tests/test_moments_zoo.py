"""The ratios and the per-layer cost ``benchmarks/moments_zoo.py`` reports."""

from __future__ import annotations

import math

import pytest
from _benchmarks import load_benchmark

zoo = load_benchmark("moments_zoo")


def test_each_round_is_compared_with_the_plain_round_of_its_block() -> None:
    # the machine halves its speed in block 2: plain 1.0 then 2.0 s per step, every step 1.5 then 3.0
    recorded = [0.0, 0.0]
    rounds = {
        "plain": [{"CPU": [1.0, 1.0], "recorded": recorded}, {"CPU": [2.0, 2.0], "recorded": recorded}],
        "every step": [{"CPU": [1.5, 1.5], "recorded": [1.0, 1.0]}, {"CPU": [3.0, 3.0], "recorded": [1.0, 1.0]}],
        "every 10th": [{"CPU": [3.0, 1.0], "recorded": [1.0, 0.0]}, {"CPU": [4.0, 2.2], "recorded": [1.0, 0.0]}],
    }
    got = zoo.paired(rounds, "CPU")
    assert got["plain"] == [1.0, 2.0]
    assert got["ratios"]["every step"] == [1.5, 1.5]  # no drift left in the ratio
    assert got["ratios"]["every 10th"] == pytest.approx([2.0, 1.55])
    assert got["ratios"]["between records"] == pytest.approx([1.0, 1.1])
    assert got["added"] == [0.5, 1.0]


def test_summary_is_the_mean_and_its_standard_error() -> None:
    mean, se = zoo.summary([1.0, 2.0, 6.0])
    assert mean == 3.0 and se == pytest.approx((7.0 / 3) ** 0.5)  # sample variance (4 + 1 + 9) / 2 = 7
    assert math.isnan(zoo.summary([1.0])[1])


def test_marginal_cost_per_layer_of_the_deep_linear_nets() -> None:
    def net(layers: int, added: float) -> dict[str, object]:
        return {"layers": layers, "CPU": {"added": [added - 0.0005, added + 0.0005]}}

    results = {"dln 25": net(25, 0.002), "dln 200": net(200, 0.0035), "resnet18": net(41, 1.0)}
    (_, line) = zoo.marginal(results, "CPU")
    assert "adds 9 µs" in line and "(25 to 200 layers)" in line  # (0.0035 - 0.002) / 175 s
    assert zoo.marginal({"dln 25": results["dln 25"]}, "CPU") == []


def test_between_records_keeps_the_steps_that_did_not_record() -> None:
    times = {"CPU": [1.0, 5.0, 2.0], "wall": [1.5, 5.5, 2.5], "recorded": [0.0, 1.0, 0.0]}
    assert zoo.between_records(times) == {"CPU": [1.0, 2.0], "wall": [1.5, 2.5], "recorded": [0.0, 0.0]}
