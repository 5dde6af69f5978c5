"""Seeds, intervals, health flags and findings, against hand-worked cases on hand-built runs."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from bnprobe import findings, health
from bnprobe.config import load_config_text
from bnprobe.errors import ModelError
from bnprobe.experiment import run_experiment
from bnprobe.stats import Interval, mean_interval, ratio_interval, t975
from bnprobe.store import RunData, scan


def test_t975_matches_published_quantiles() -> None:
    # t tables: df 1 -> 12.706, 2 -> 4.303, 10 -> 2.228, 30 -> 2.042, 60 -> 2.000, 120 -> 1.980
    for df, value in ((1, 12.706), (2, 4.303), (10, 2.228), (30, 2.042), (60, 2.000), (120, 1.980)):
        assert t975(df) == pytest.approx(value, abs=2e-3)
    with pytest.raises(ValueError):
        t975(0)


def test_mean_interval_by_hand() -> None:
    # 1, 2, 3: mean 2, s 1, half width 4.3027 / sqrt(3)
    found = mean_interval([1.0, 2.0, 3.0])
    assert found is not None
    half = 4.3027 / math.sqrt(3)
    assert (found.mean, found.low, found.high, found.n) == pytest.approx((2.0, 2 - half, 2 + half, 3))
    one = mean_interval([5.0, float("nan")])
    assert one is not None and one.n == 1 and one.low is None and one.high is None
    assert mean_interval([]) is None


def test_ratio_interval_is_symmetric_on_the_log_scale() -> None:
    found = ratio_interval([2.0, 0.5])
    assert found is not None and found.mean == pytest.approx(1.0)
    assert found.low is not None and found.high is not None
    assert found.low * found.high == pytest.approx(1.0)
    assert not found.excludes(1.0)
    tight = ratio_interval([0.5, 0.51, 0.49])
    assert tight is not None and tight.excludes(1.0) and tight.high is not None and tight.high < 1


def _run(name: str, loss: np.ndarray, acc: np.ndarray | None = None, **attrs: object) -> RunData:
    steps = np.arange(len(loss))
    base = {"task": "classification", "num_outputs": 10, "status": "finished", "bn": "keep", "bn_layers": 0, "seed": 0}
    run = RunData(name, {**base, **attrs}, [])
    run.data["train/step"] = steps
    run.data["train/loss"] = loss.astype(np.float64)
    run.data["train/accuracy"] = (acc if acc is not None else np.full(len(loss), 0.5)).astype(np.float64)
    return run


def test_collapse_flag_at_the_step_the_loss_returns_to_chance() -> None:
    chance = math.log(10)
    loss = np.concatenate([np.full(50, chance), np.full(50, 0.5 * chance), np.full(100, chance)])
    flags = health.run_flags(_run("r", loss))
    assert [f.kind for f in flags] == [health.COLLAPSED]
    # the 20-step mean passes 0.95 ln 10 once 19 of its 20 steps are back at chance: 100 + 18
    assert flags[0].step == 118
    # never learned: no collapse; learned and stayed: no collapse
    assert health.run_flags(_run("r", np.full(200, chance))) == []
    assert health.run_flags(_run("r", np.concatenate([np.full(50, chance), np.full(150, 1.0)]))) == []


def test_fitted_flag_by_accuracy_and_by_loss() -> None:
    acc = np.concatenate([np.full(30, 0.5), np.full(70, 1.0)])
    flags = health.run_flags(_run("r", np.full(100, 1.0), acc))
    # the 20-step mean accuracy reaches 0.99 when 20 * 0.99 = 19.8 of the last 20 are 1.0: all 20, step 49
    assert [(f.kind, f.step) for f in flags] == [(health.FITTED, 49)]
    loss = np.concatenate([np.full(10, 2.0), np.full(90, 0.001)])
    flags = health.run_flags(_run("r", loss))
    # L0 = 2.0; the mean drops below 0.02 once (2.0 k + 0.001 (20 - k)) / 20 < 0.02 with k the 2.0 steps left: k = 0, step 29
    assert [(f.kind, f.step) for f in flags] == [(health.FITTED, 29)]


@pytest.mark.parametrize("numbers", [1, scan.SLICE_NUMBERS])  # a record at a time (a long run's records), or all at once
def test_dead_layer_needs_a_relu_for_max_below_zero(monkeypatch: pytest.MonkeyPatch, numbers: int) -> None:
    monkeypatch.setattr(scan, "SLICE_NUMBERS", numbers)
    run = _run("r", np.full(40, 1.0), relu_fed=["a"])
    run.layers = [{"name": n, "kind": "linear", "param_count": 1, "output_shape": "1", "order": i} for i, n in enumerate("abc")]
    run.data["moments/step"] = np.array([0, 10, 20])
    run.data["moments/max"] = np.array([[1.0, -1.0, 1.0], [-0.5, -1.0, 1.0], [-0.5, -1.0, 1.0]])
    run.data["moments/var"] = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    flags = health.run_flags(run)
    # a: max <= 0 and feeds a ReLU, from step 10; b: max <= 0 but feeds no ReLU; c: constant from step 20
    assert [(f.kind, f.step, f.detail.split(":")[0]) for f in flags] == [(health.DEAD, 10, "a"), (health.DEAD, 20, "c")]


def test_diverged_flag() -> None:
    flags = health.run_flags(_run("r", np.array([2.0, 2.0, np.inf]), status="diverged"))
    assert [(f.kind, f.step) for f in flags] == [(health.DIVERGED, 2)]  # no diverged_step stored: the last step
    flags = health.run_flags(_run("r", np.array([2.0, 2.0, np.inf]), status="diverged", diverged_step=7))
    assert [(f.kind, f.step) for f in flags] == [(health.DIVERGED, 7)]


def test_bn_labels_come_from_what_the_model_holds() -> None:
    assert findings.bn_label({"bn": "keep", "bn_layers": 0}) == "no BN"
    assert findings.bn_label({"bn": "keep", "bn_layers": 8}) == "BN"
    assert findings.bn_label({"bn": "insert", "bn_layers": 8}) == "BN"
    assert findings.bn_label({"bn": "noisy", "bn_layers": 8}) == "noisy BN"
    assert findings.bn_label({"bn": "strip", "bn_layers": 0, "bn_removed": 8}) == "BN stripped"
    assert findings.bn_label({"bn": "strip", "bn_layers": 0, "bn_removed": 8, "fold": True}) == "BN folded"
    assert findings.bn_label({"bn": "strip", "bn_layers": 0, "bn_removed": 0}) == "no BN"


def _landscape_run(seed: int, bn: bool, beta: list[float], lr: float = 0.1) -> RunData:
    run = _run(f"{'bn' if bn else 'plain'}-{seed}", np.linspace(2.0, 1.0, 100), seed=seed, bn="insert" if bn else "keep",
               bn_layers=4 if bn else 0, lr=lr)  # fmt: skip
    run.data["landscape/step"] = np.arange(0, 100, 100 // len(beta))
    run.data["landscape/beta_smoothness"] = np.asarray(beta)
    return run


def test_conditions_group_by_bn_label_and_the_settings_that_differ() -> None:
    runs = [_landscape_run(s, bn, [1.0], lr) for lr in (0.1, 0.01) for bn in (False, True) for s in (0, 1)]
    runs.append(_landscape_run(0, False, [1.0], 0.1))  # a second run of seed 0: a repeat
    conds = findings.conditions(runs)
    assert [(c.label, c.settings, c.seeds) for c in conds] == [
        ("no BN", (("lr", 0.1),), [0, 1]),
        ("BN", (("lr", 0.1),), [0, 1]),
        ("no BN", (("lr", 0.01),), [0, 1]),
        ("BN", (("lr", 0.01),), [0, 1]),
    ]
    assert conds[0].repeats == 1
    assert [(a.label, b.label, a.settings) for a, b in findings.partners(conds)] == [
        ("no BN", "BN", (("lr", 0.1),)),
        ("no BN", "BN", (("lr", 0.01),)),
    ]


def test_findings_ratio_paired_by_seed_matches_a_hand_computation() -> None:
    plain = [[4.0, 4.0], [6.0, 6.0], [5.0, 5.0]]
    with_bn = [[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]]
    runs = [_landscape_run(s, False, b) for s, b in enumerate(plain)] + [_landscape_run(s, True, b) for s, b in enumerate(with_bn)]
    [found] = findings.findings(runs)
    logs = [math.log(b[0] / p[0]) for p, b in zip(plain, with_bn)]
    mean = sum(logs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / 2)
    half = t975(2) * sd / math.sqrt(3)
    i = found.whole.interval
    assert (i.mean, i.low, i.high) == pytest.approx((math.exp(mean), math.exp(mean - half), math.exp(mean + half)))
    assert found.window.window == (0, None) and found.learning is found.whole
    assert found.whole.direction == "lower" and found.agrees is True
    assert found.verdict.startswith(f"BN lowered effective beta {1 / math.exp(mean):.3g}x [")
    assert found.verdict.endswith("over the whole run, 3 seeds")


def test_learning_window_ends_at_the_first_flag_of_any_compared_run() -> None:
    runs = [_landscape_run(s, bn, [1.0, 1.0, 1.0, 9.0] if bn else [2.0, 2.0, 2.0, 1.0]) for bn in (False, True) for s in (0, 1)]
    acc = np.concatenate([np.full(50, 0.5), np.full(50, 1.0)])
    runs[3].data["train/accuracy"] = acc  # BN seed 1 fits: 20-step mean accuracy >= 0.99 from step 69
    [found] = findings.findings(runs)
    assert found.window.window == (0, 69)
    assert found.learning is not None and found.learning.window == (0, 69)
    assert found.learning.interval.mean == pytest.approx(0.5)  # records 0, 25, 50: 1 / 2 in both seeds
    assert "steps 0-68" in found.verdict
    runs[3].data["train/accuracy"] = np.ones(100)  # fitted from step 19; records 0 only
    [found] = findings.findings(runs)
    assert found.window.window == (0, 19) and found.learning is not None and found.learning.interval.n == 2
    assert found.whole.interval.mean == pytest.approx((1.0 * 3 + 9.0) / (2.0 * 3 + 1.0))


def test_one_seed_says_it_has_no_interval() -> None:
    runs = [_landscape_run(0, False, [2.0]), _landscape_run(0, True, [1.0])]
    [found] = findings.findings(runs)
    assert found.verdict == "BN lowered effective beta 2x over the whole run, 1 seed: no interval"
    assert found.agrees is None


#: (ratio, expectation) -> agrees, for three seeds whose interval is ratio x [0.9, 1.1]
THREE_SEEDS = {
    (0.5, "lower"): True, (0.5, "not lower"): False, (0.5, "not higher"): True,
    (1.0, "lower"): None, (1.0, "not lower"): True, (1.0, "not higher"): True,
    (2.0, "lower"): False, (2.0, "not lower"): True, (2.0, "not higher"): False,
}  # fmt: skip


@pytest.mark.parametrize(("ratio", "expect"), list(THREE_SEEDS))
def test_one_seed_cannot_tell_whatever_the_claim_expects(ratio: float, expect: str) -> None:
    assert findings.Effect(Interval(ratio, None, None, 1), True, (0, None)).agrees(expect) is None
    three = findings.Effect(Interval(ratio, ratio * 0.9, ratio * 1.1, 3), True, (0, None))
    assert three.agrees(expect) is THREE_SEEDS[ratio, expect]


def test_no_clear_difference_when_the_interval_includes_one() -> None:
    runs = [_landscape_run(s, False, [1.0]) for s in (0, 1)] + [_landscape_run(0, True, [2.0]), _landscape_run(1, True, [0.6])]
    [found] = findings.findings(runs)
    assert found.whole.direction == "no clear difference"
    assert "no clear difference in effective beta" in found.verdict and found.agrees is None


def _train(tmp_path: Path, text: str) -> dict[str, list[dict[str, object]]]:
    cfg = load_config_text(text + f"output: {tmp_path / 'run.h5'}\n", "test")
    with contextlib.suppress(ModelError):  # a diverged variant ends the command with an error, its records kept
        run_experiment(cfg)
    with h5py.File(tmp_path / "run.h5", "r") as h5:
        return {name: json.loads(group.attrs["health"]) for name, group in h5["runs"].items()}


def test_a_run_that_fits_its_data_stores_the_flag(tmp_path: Path) -> None:
    """The prototype images: BN fits them in a few dozen steps, the plain VGG does not."""
    flags = _train(
        tmp_path,
        "model: vgg\nmodel_options: {width: 0.25}\ndata: synthetic:cifar10\ndata_options: {n: 512}\n"
        "steps: 60\nbatch_size: 64\nlr: 0.1\nprobes: {moments: {every: 20}}\nvariants: {bn: [keep, insert]}\n",
    )
    assert flags["keep"] == []
    [fitted] = flags["insert"]
    assert fitted["kind"] == health.FITTED and 19 <= int(fitted["step"]) < 60  # type: ignore[call-overload]


_DEAD = """
import torch
from torch import nn

def make(num_classes, input_shape, bias=-50.0):
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, num_classes))
    with torch.no_grad():
        net[1].bias.fill_(bias)
    return net
"""


@pytest.mark.parametrize(("bias", "dead"), [(-50.0, True), (0.0, False)])
def test_a_layer_whose_relu_is_off_everywhere_is_flagged_dead(tmp_path: Path, bias: float, dead: bool) -> None:
    (tmp_path / "net.py").write_text(_DEAD)
    flags = _train(
        tmp_path,
        f"model: {tmp_path / 'net.py'}:make\nmodel_options: {{bias: {bias}}}\ndata: synthetic:mnist\ndata_options: {{n: 256}}\n"
        "steps: 10\nbatch_size: 32\nlr: 0.01\nprobes: {moments: {every: 5}}\n",
    )
    found = [(f["kind"], f["step"], str(f["detail"]).split(":")[0]) for f in flags["keep"]]
    assert found == ([(health.DEAD, 0, "1")] if dead else [])


def test_a_run_that_diverges_is_flagged_at_its_step(tmp_path: Path) -> None:
    flags = _train(
        tmp_path,
        "model: mlp\nmodel_options: {activation: relu}\ndata: synthetic:mnist\ndata_options: {n: 512}\nsteps: 40\nbatch_size: 64\nlr: 3.0\n",
    )
    [(name, [flag])] = flags.items()
    assert flag["kind"] == health.DIVERGED
    with h5py.File(tmp_path / "run.h5", "r") as h5:
        assert flag["step"] == int(h5["runs"][name].attrs["diverged_step"])


def test_learning_window_starts_when_every_run_has_left_chance() -> None:
    """A run on its chance plateau (ln 10) until step 40 moves the window's start there; one that
    never leaves it leaves no window, and the verdict says why."""
    runs = [_landscape_run(s, bn, [1.0, 1.0, 1.0, 1.0] if bn else [4.0, 4.0, 2.0, 2.0]) for bn in (False, True) for s in (0, 1)]
    chance = math.log(10)
    runs[0].data["train/loss"] = np.concatenate([np.full(40, chance), np.full(60, 1.0)])
    # the 20-step mean, ln 10 - k (ln 10 - 1) / 20 with k steps at 1.0, is below 0.9 ln 10 from k = 4: step 43
    assert health.learning_start(runs[0]) == 43 and health.learning_start(runs[2]) == 0
    [found] = findings.findings(runs)
    assert found.window.window == (43, None)
    assert found.learning is not None and found.learning.interval.mean == pytest.approx(0.5)  # records 50 and 75
    assert "over steps 43-end" in found.verdict
    runs[0].data["train/loss"] = np.full(100, chance)
    [found] = findings.findings(runs)
    assert found.learning is None and found.agrees is None
    assert f"no learning window ({runs[0].name} never left its chance level: train longer or try another lr)" in found.verdict
    assert "see Health" not in found.verdict  # no health flag explains it


def test_runs_on_other_data_options_or_lengths_are_other_conditions() -> None:
    runs = [_landscape_run(0, False, [1.0]), _landscape_run(0, False, [1.0]), _landscape_run(0, False, [1.0])]
    runs[1].attrs["data_options"] = '{"noise": 6.0}'
    runs[2].attrs["planned_steps"] = 50
    conds = findings.conditions(runs)
    assert len(conds) == 3 and all(c.repeats == 0 for c in conds)


def _recorded_run(**data: np.ndarray) -> RunData:
    run = _run("r", np.linspace(2.0, 1.0, 30))
    run.data.update(data)
    return run


@pytest.mark.parametrize("numbers", [1, scan.SLICE_NUMBERS])  # a record at a time (a long run's records), or all at once
def test_percentile_drift_by_hand(monkeypatch: pytest.MonkeyPatch, numbers: int) -> None:
    """Three records of two layers (the second feeds no non-linearity: the output): the mean
    absolute change of p15/p50/p85 of the first layer between consecutive records."""
    monkeypatch.setattr(scan, "SLICE_NUMBERS", numbers)
    run = _recorded_run(**{"moments/step": np.array([0, 10, 20])})
    run.layers = [{"name": n, "kind": "linear", "param_count": 1, "output_shape": "1", "order": i} for i, n in enumerate(["h", "out"])]
    run.data["moments/p15"] = np.array([[0.0, 9.0], [1.0, 9.0], [3.0, 0.0]])
    run.data["moments/p50"] = np.array([[0.0, 9.0], [0.0, 9.0], [0.0, 0.0]])
    run.data["moments/p85"] = np.array([[2.0, 9.0], [2.0, 9.0], [5.0, 0.0]])
    # changes of h: p15 1, 2; p50 0, 0; p85 0, 3 -> mean 1
    assert findings.percentile_drift(run, (0, None)) == pytest.approx(1.0)
    assert findings.percentile_drift(run, (0, 20)) == pytest.approx((1 + 0 + 0) / 3)
    run.layers.append({"name": "h_bn", "kind": "norm", "param_count": 1, "output_shape": "1", "order": 2})
    run.layers[1]["order"] = 3
    for q in ("p15", "p50", "p85"):  # with a BN layer, only the BN layers' inputs count
        run.data[f"moments/{q}"] = np.concatenate([run.data[f"moments/{q}"], np.array([[0.0], [0.5], [0.5]])], axis=1)
    run.layers = sorted(run.layers, key=lambda lay: lay["order"])
    run.data["moments/p15"] = run.data["moments/p15"][:, [0, 2, 1]]
    run.data["moments/p50"] = run.data["moments/p50"][:, [0, 2, 1]]
    run.data["moments/p85"] = run.data["moments/p85"][:, [0, 2, 1]]
    assert findings.percentile_drift(run, (0, None)) == pytest.approx((0.5 + 0 + 0.5 + 0 + 0.5 + 0) / 6)


@pytest.mark.parametrize("numbers", [1, scan.SLICE_NUMBERS])  # a record at a time (a long run's records), or all at once
def test_landscape_spreads_and_ics_means_by_hand(monkeypatch: pytest.MonkeyPatch, numbers: int) -> None:
    monkeypatch.setattr(scan, "SLICE_NUMBERS", numbers)
    run = _recorded_run(**{
        "landscape/step": np.array([0, 10]),
        "landscape/loss": np.array([[1.0, 3.0, 2.0], [1.0, 1.5, 1.0]]),
        "ics/step": np.array([0, 10]),
        "ics/layer": np.array([b"a", b"bn"]),
        "ics/l2": np.array([[1.0, 100.0], [3.0, 100.0]]),
    })  # fmt: skip
    run.layers = [
        {"name": "a", "kind": "conv", "param_count": 1, "output_shape": "1", "order": 0},
        {"name": "bn", "kind": "norm", "param_count": 1, "output_shape": "1", "order": 1},
    ]
    loss_variation = next(q for q in findings.QUANTITIES if q.key == "landscape.loss_variation")
    assert loss_variation.reduce(run, (0, None)) == pytest.approx((2.0 + 0.5) / 2)
    ics_l2 = next(q for q in findings.QUANTITIES if q.key == "ics.l2")
    assert ics_l2.reduce(run, (0, None)) == pytest.approx(2.0)  # the norm layer's own ICS is left out


def test_top_share_by_hand() -> None:
    """Three records: a trace of 10 +- 1 with top eigenvalue 5 (share 0.5); a trace of 1 +- 1,
    within two standard errors of zero, and a negative one, both left out; the window picks."""
    run = _recorded_run(**{
        "spectrum/step": np.array([0, 10, 20]), "spectrum/top_k": np.array([[5.0], [0.9], [2.0]]),
        "spectrum/trace": np.array([10.0, 1.0, -5.0]), "spectrum/trace_stderr": np.array([1.0, 1.0, 1.0]),
    })  # fmt: skip
    assert findings.top_share(run, (0, None)) == pytest.approx(0.5)
    assert findings.top_share(run, (10, None)) is None
