"""Interrupts, divergence, resume and crashes lose nothing and never leave an unreadable file."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnprobe.cli import app
from bnprobe.config import load_config
from bnprobe.experiment import resume_experiment, run_experiment
from bnprobe.store import read_file
from bnprobe.trainer import StepInfo

runner = CliRunner()


# Every stateful thing a resume must carry over: noisy-BN draws, ICS steps, the Hessian warm start.
_ALL_PROBES = {
    "bn": "noisy",
    "probes.ics.every": 3,
    "probes.landscape.enabled": True,
    "probes.hessian.enabled": True,
    "probes.hessian.max_iter": 4,
    "probes.hessian.tol": 1e-9,
}


@pytest.mark.parametrize("extra", [{}, _ALL_PROBES], ids=["moments", "noisy-ics-landscape-hessian"])
def test_interrupt_then_resume_equals_an_uninterrupted_run(in_tmp: Path, tiny_config: Path, extra: dict) -> None:
    cfg = load_config(tiny_config, {"steps": 9, "probes.moments.every": 2, "checkpoint_every": 2, "output": "full.h5", **extra})
    run_experiment(cfg)

    def stop_at_5(info: StepInfo) -> None:
        if info.step == 5:
            raise KeyboardInterrupt("stopped by the test at step 5")

    cut = load_config(tiny_config, {"steps": 9, "probes.moments.every": 2, "checkpoint_every": 2, "output": "cut.h5", **extra})
    with pytest.raises(KeyboardInterrupt, match="stopped by the test at step 5"):
        run_experiment(cut, progress=stop_at_5)
    variant = cfg.bn.value
    assert read_file("cut.h5").runs[variant].attrs["status"] == "interrupted"
    cut_write_seconds = read_file("cut.h5").runs[variant].attrs["write_seconds"]
    resume_experiment(Path("cut.h5"))
    full, resumed = read_file("full.h5").runs[variant], read_file("cut.h5").runs[variant]
    assert resumed.attrs["status"] == "finished" and resumed.attrs["steps"] == 9
    assert set(full.data) == set(resumed.data)
    assert np.all(np.diff(resumed.data["train/seconds"]) >= 0)  # the clock goes on from the checkpoint
    assert resumed.attrs["write_seconds"] >= cut_write_seconds
    for key in full.data:
        if not key.endswith("seconds"):
            np.testing.assert_array_equal(full.data[key], resumed.data[key], err_msg=key)


def test_divergence_keeps_records_and_other_variants_run(in_tmp: Path, tiny_config: Path) -> None:
    cfg = load_config(tiny_config, {"variants.lr": [1e6, 0.01], "steps": 8})
    _, results = run_experiment(cfg)
    by_name = {r.name: r for r in results}
    assert by_name["lr1000000.0"].status == "diverged" and by_name["lr0.01"].status == "finished"
    runs = read_file("runs/tiny.h5").runs
    diverged = runs["lr1000000.0"]
    assert diverged.attrs["status"] == "diverged" and diverged.attrs["diverged_step"] == diverged.data["train/step"][-1]
    assert not np.isfinite(diverged.data["train/loss"][-1])
    result = runner.invoke(app, ["train", str(tiny_config), "--steps", "4", "--lr", "1e6", "-o", "d.h5"])
    assert result.exit_code == 3 and "diverged" in result.output


def _spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "bnprobe.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_records(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            try:
                if len(read_file(path).runs["keep"].data.get("train/step", [])) >= 4:
                    return
            except Exception:  # noqa: BLE001 - the writer may be mid-flush
                pass
        if proc.poll() is not None:
            raise AssertionError(proc.communicate())
        time.sleep(0.2)
    raise AssertionError("no records appeared")


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_signals_leave_a_readable_file(tmp_path: Path, tiny_config: Path, sig: int, code: int) -> None:
    args = ["train", str(tiny_config), "--steps", "100000", "--flush-every", "2", "-o", "run.h5"]
    proc = _spawn(args, tmp_path)
    _wait_for_records(tmp_path / "run.h5", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    run = read_file(tmp_path / "run.h5").runs["keep"]
    status = "running" if sig == signal.SIGKILL else "interrupted"
    assert run.attrs["status"] == status
    steps = run.data["train/step"]
    assert len(steps) >= 4 and steps.tolist() == list(range(len(steps)))  # every step up to the stop, in order
    assert np.isfinite(run.data["train/loss"]).all() and len(run.data["train/loss"]) == len(steps)
    moment_steps = run.data["moments/step"].tolist()
    if sig == signal.SIGKILL:  # killed between two sections' writes of one flush: they may differ by that flush's records
        assert moment_steps == list(range(0, len(moment_steps) * 2, 2)) and abs(len(moment_steps) * 2 - len(steps)) <= 2
    else:
        assert moment_steps == list(range(0, len(steps), 2))  # moments every 2 steps: none lost
    assert all(np.isfinite(run.data[f"moments/{s}"]).all() for s in ("mean", "var", "p50"))
    if sig != signal.SIGKILL:
        assert "interrupted; what was recorded is in run.h5" in err
        assert "Traceback" not in err
        assert run.attrs["steps"] == len(steps)  # stopped at a step boundary, that step kept
    # the report reads it: exit 0, the status said, and the numbers are the file's
    report = runner.invoke(app, ["report", str(tmp_path / "run.h5")])
    assert report.exit_code == 0 and report.exception is None, report.output
    assert (
        "status running: the run did not finish" if status == "running" else "keep: interrupted; showing records up to the stop"
    ) in report.output
    content = runner.invoke(app, ["report", "--json", str(tmp_path / "run.h5")])
    assert content.exit_code == 0, content.output
    summary = json.loads(content.output)["files"][0]["runs"]["keep"]["summary"]
    assert summary["status"] == status and summary["records"] == len(steps) and summary["last_step"] == steps[-1]
    assert summary["final_loss"] == float(run.data["train/loss"][-1])


def test_late_user_error_writes_nothing_and_force_keeps_the_old_file(in_tmp: Path, tiny_config: Path) -> None:
    """A mistake found after the models are built (a layer glob that matches nothing) leaves no
    file behind; with --force the user's existing file stays byte for byte."""
    result = runner.invoke(app, ["train", str(tiny_config), "--layers", "nothing*", "-o", "new.h5"])
    assert result.exit_code == 2 and "no layer matches" in result.output
    assert not Path("new.h5").exists()
    Path("old.h5").write_bytes(b"precious results")
    result = runner.invoke(app, ["train", str(tiny_config), "--layers", "nothing*", "-o", "old.h5", "--force"])
    assert result.exit_code == 2
    assert Path("old.h5").read_bytes() == b"precious results" and not list(Path().glob(".*partial"))


def test_interrupt_before_the_first_step_keeps_the_old_file(in_tmp: Path, tiny_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnprobe.trainer

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bnprobe.trainer, "_plain_step", stop)
    Path("old.h5").write_bytes(b"precious results")
    result = runner.invoke(app, ["train", str(tiny_config), "-o", "old.h5", "--force"])
    assert result.exit_code == 130 and "before the first step" in result.output
    assert Path("old.h5").read_bytes() == b"precious results" and not list(Path().glob(".*partial"))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_inside_a_weakref_callback_still_stops_the_run(
    in_tmp: Path, tiny_config: Path, monkeypatch: pytest.MonkeyPatch, sig: int, code: int
) -> None:
    """Python swallows an exception raised in a weakref callback ("Exception ignored in ..."): a
    signal delivered there must still stop the run, after the step it arrived in, with that step kept."""
    import weakref

    import bnprobe.trainer

    plain_step = bnprobe.trainer._plain_step
    calls = []

    def step_with_signal(*args: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            holder = type("Holder", (), {})()
            ref = weakref.ref(holder, lambda _: os.kill(os.getpid(), sig))  # noqa: F841 - keeps the callback alive
            del holder
        return plain_step(*args)

    monkeypatch.setattr(bnprobe.trainer, "_plain_step", step_with_signal)
    result = runner.invoke(app, ["train", str(tiny_config), "--steps", "50", "-o", "r.h5"])
    assert result.exit_code == code, result.output
    assert "interrupted; what was recorded is in r.h5" in result.output
    run = read_file(Path("r.h5")).runs["keep"]
    assert run.attrs["status"] == "interrupted" and run.attrs["steps"] == 3
    assert list(run.data["train/step"]) == [0, 1, 2]


def test_a_signal_waits_for_the_step_but_a_second_one_stops_at_once() -> None:
    from bnprobe.cli_output import StopRequests, Terminated

    # the interrupts carry no message (match "^$"); the type tells SIGINT from SIGTERM (a subclass)
    with pytest.raises(KeyboardInterrupt, match=r"^$") as first:  # before the first step nothing is half-written
        StopRequests().on_signal(signal.SIGINT, None)
    assert first.type is KeyboardInterrupt
    stops = StopRequests()
    stops.check()
    stops.on_signal(signal.SIGTERM, None)  # during steps: remembered, raised at the boundary
    with pytest.raises(Terminated, match=r"^$"):
        stops.check()
    with pytest.raises(KeyboardInterrupt, match=r"^$") as second:
        stops.on_signal(signal.SIGINT, None)
    assert second.type is KeyboardInterrupt


def test_a_signal_during_the_processes_vote_waits_for_the_next_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun a process waits in the vote on stopping (an all-reduce) while a slower peer
    finishes its step: a signal arriving then is kept for the next vote, not overwritten by this one's result."""
    import bnprobe.distributed
    from bnprobe.cli_output import StopRequests, Terminated

    stops = StopRequests()
    stops.check()

    def vote_interrupted_by_a_signal(pending: int | None) -> int | None:
        stops.on_signal(signal.SIGTERM, None)  # lands while the all-reduce waits; the peers voted no
        return pending

    monkeypatch.setattr(bnprobe.distributed, "agreed_signal", vote_interrupted_by_a_signal)
    stops.check()  # this step's vote: nobody had a signal when they voted
    monkeypatch.setattr(bnprobe.distributed, "agreed_signal", lambda pending: pending)
    with pytest.raises(Terminated):
        stops.check()


def test_a_layer_glob_may_match_in_some_variants_only(in_tmp: Path, tiny_config: Path) -> None:
    """``--layers '*_bn'`` probes only the inserted BN layers: the keep variant records no moments."""
    result = runner.invoke(
        app, ["train", str(tiny_config), "--bn", "keep", "--bn", "insert", "--layers", "*_bn", "--ics-every", "2", "-o", "r.h5"]
    )
    assert result.exit_code == 0, result.output
    runs = read_file("r.h5").runs
    assert "moments/mean" not in runs["keep"].data and "ics/l2" not in runs["keep"].data
    assert len(runs["keep"].data["train/loss"]) == 6
    names = [lay["name"] for lay in runs["insert"].layers]
    assert names and all(n.endswith("_bn") for n in names) and runs["insert"].data["ics/l2"].shape[1] == len(names)


DROPOUT_MODEL = """
import torch
from torch import nn


def make(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, num_classes))
"""


def test_a_variant_trains_alike_alone_or_after_others_and_building_leaves_the_global_rng(in_tmp: Path) -> None:
    """Dropout draws from the global stream: each variant starts it from the seed, whatever ran
    before it, and building a model does not move the caller's stream."""
    (in_tmp / "drop.py").write_text(DROPOUT_MODEL)
    base = {"model": "drop.py:make", "data_options": {"n": 64}, "steps": 4, "batch_size": 16}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _, alone = run_experiment(load_config(None, {**base, "lr": 0.05, "output": "alone.h5"}))
    run_experiment(load_config(None, {**base, "variants.lr": [0.1, 0.05], "output": "both.h5"}))
    assert alone[0].status == "finished"
    second = read_file("both.h5").runs["lr0.05"].data["train/loss"]
    np.testing.assert_array_equal(read_file("alone.h5").runs["keep"].data["train/loss"], second)
    from bnprobe.data import load_data
    from bnprobe.trainer import prepare_model

    torch.set_rng_state(before)
    prepare_model(load_config(None, base), load_data("synthetic:cifar10", n=8), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)
