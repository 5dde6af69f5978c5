"""Outputs lose nothing: one writer per file, a resume that checks before it writes, damaged
checkpoints refused, full disks and second interrupts leaving a file that opens and agrees with
itself, and no output replacing something that is not a regular file."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from bnprobe.cli import app
from bnprobe.config import load_config
from bnprobe.experiment import run_experiment
from bnprobe.store import OutputLock, read_file, signals_deferred
from bnprobe.trainer import StepInfo

runner = CliRunner()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("bnprobe: error")]


def _read_consistently(path: Path) -> None:
    """As bnprobe reads it, every record dataset of every run has as many rows as its section's
    step axis (a record the disk refused half-way, in one dataset only, is not read)."""
    for run in read_file(path).runs.values():
        for key in run.data:
            section = key.split("/", 1)[0]
            if f"{section}/step" in run.data and run.data.shape(key) and key != "layers":
                assert run.data.shape(key)[0] == run.data.shape(f"{section}/step")[0], key


def _consistent(path: Path) -> None:
    """Every record dataset of every run has as many rows as its section's step axis."""

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Group) and isinstance(obj.get("step"), h5py.Dataset):
            steps = obj["step"].shape[0]
            for key, ds in obj.items():
                if isinstance(ds, h5py.Dataset) and ds.maxshape and ds.maxshape[0] is None:
                    assert ds.shape[0] == steps, f"{name}/{key}: {ds.shape[0]} rows, {steps} steps"

    with h5py.File(path, "r", locking=False) as h5:
        h5.visititems(visit)


def _interrupted_run(tiny_config: Path, output: str, model: str | None = None) -> Path:
    """A run stopped by Ctrl-C at step 5, with checkpoints every 2 steps."""
    extra = {"model": model, "model_options": {}} if model else {}
    cfg = load_config(tiny_config, {"steps": 9, "checkpoint_every": 2, "output": output, **extra})

    def stop_at_5(info: StepInfo) -> None:
        if info.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, progress=stop_at_5)
    return Path(output)


# ----------------------------------------------------------------------------- one writer per file

_HOLD = """
import sys, time
from bnprobe.store import OutputLock
lock = OutputLock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def held_by_another_process(in_tmp: Path) -> Iterator[tuple[Path, int]]:
    """``x.h5`` locked by a child process for the test's duration: (path, the child's PID)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", _HOLD, "x.h5"], cwd=in_tmp, env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "locked"
    yield in_tmp / "x.h5", child.pid
    child.kill()
    child.wait()


def test_a_second_writer_is_refused_naming_the_process_that_writes(held_by_another_process: tuple[Path, int], tiny_config: Path) -> None:
    path, pid = held_by_another_process
    path.write_bytes(b"the other process's run")
    for args in (["train", str(tiny_config), "-o", "x.h5", "--force"], ["export", "r.h5", "-o", "x.h5", "--force"]):
        if args[0] == "export":
            run_experiment(load_config(tiny_config, {"steps": 2, "output": "r.h5"}))
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert _error_lines(result.output) == [
            f"bnprobe: error: x.h5 is being written by process {pid}; wait for it to end or choose another --output"
        ]
        assert path.read_bytes() == b"the other process's run" and not list(Path().glob(".x.h5.partial"))


def test_a_second_resume_of_one_file_is_refused_and_touches_nothing(in_tmp: Path, tiny_config: Path) -> None:
    path = _interrupted_run(tiny_config, "x.h5")
    before = _digest(path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", _HOLD, "x.h5"], cwd=in_tmp, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        result = runner.invoke(app, ["train", "--resume", "x.h5"])
        assert result.exit_code == 2 and f"x.h5 is being written by process {child.pid}" in result.output
        assert _digest(path) == before
    finally:
        child.kill()
        child.wait()
    result = runner.invoke(app, ["train", "--resume", "x.h5"])  # the lock went with its process
    assert result.exit_code == 0, result.output


def test_the_lock_is_held_while_writing_and_gone_after(in_tmp: Path, tiny_config: Path) -> None:
    seen = []

    def try_to_lock(info: StepInfo) -> None:
        if info.step == 1:
            with pytest.raises(Exception, match=f"x.h5 is being written by process {os.getpid()}"):
                OutputLock.acquire("x.h5")
            seen.append(info.step)

    run_experiment(load_config(tiny_config, {"steps": 2, "output": "x.h5"}), progress=try_to_lock)
    assert seen == [1] and sorted(p.name for p in in_tmp.iterdir()) == ["tiny.yaml", "x.h5"]
    OutputLock.acquire("x.h5").release()


# ----------------------------------------------------------------------------- resume checks first

_MODEL = """
from torch import nn


def make(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, {width}), nn.ReLU(), nn.Linear({width}, num_classes))
"""


@pytest.mark.parametrize(
    ("edit", "killed", "error"),
    [
        (_MODEL.format(width=16), False, "the checkpoint of run 'keep' does not fit its model and config"),
        ("def make(:\n", True, "syntax error in"),
    ],
    ids=["wider", "syntax-error-before-the-first-checkpoint"],
)
def test_resume_checks_the_model_and_checkpoint_before_touching_the_file(
    in_tmp: Path, tiny_config: Path, edit: str, killed: bool, error: str
) -> None:
    (in_tmp / "m.py").write_text(_MODEL.format(width=8))
    path = _interrupted_run(tiny_config, "x.h5", model="m.py:make")
    if killed:  # as a run killed before its first checkpoint leaves it: records, no checkpoint, "running"
        with h5py.File(path, "r+") as h5:
            del h5["runs/keep/checkpoint"]
            h5["runs/keep"].attrs["status"] = "running"
    before = _digest(path)
    (in_tmp / "m.py").write_text(edit)
    result = runner.invoke(app, ["train", "--resume", "x.h5"])
    assert result.exit_code == 2 and error in result.output, result.output
    assert len(_error_lines(result.output)) == 1
    assert _digest(path) == before


def test_a_damaged_checkpoint_is_refused(in_tmp: Path, tiny_config: Path) -> None:
    path = _interrupted_run(tiny_config, "x.h5")
    with h5py.File(path, "r+") as h5:
        blob = h5["runs/keep/checkpoint"]
        blob[len(blob) // 2 : len(blob) // 2 + 64] = 0x5A  # inside the weights
    before = _digest(path)
    result = runner.invoke(app, ["train", "--resume", "x.h5"])
    assert result.exit_code == 2
    assert _error_lines(result.output) == [
        "bnprobe: error: the checkpoint of run 'keep' in x.h5 is damaged (its SHA-256 does not match); it cannot be resumed"
    ]
    assert _digest(path) == before


# ----------------------------------------------------------------------------- full disks


def _disk_fills_after(monkeypatch: pytest.MonkeyPatch, writes: int) -> None:
    """The disk has room for ``writes`` writes, then none."""
    import bnprobe.store.guard

    calls = []

    def free(_directory: Path) -> int:
        calls.append(1)
        return 1 << 40 if len(calls) <= writes else 0

    monkeypatch.setattr(bnprobe.store.guard, "free_bytes", free)


def test_a_disk_full_mid_run_stops_it_with_one_line_and_a_file_that_opens(
    in_tmp: Path, tiny_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _disk_fills_after(monkeypatch, 6)
    result = runner.invoke(app, ["train", str(tiny_config), "--steps", "40", "--flush-every", "2", "-o", "x.h5"])
    assert result.exit_code == 2, result.output
    assert _error_lines(result.output) == ["bnprobe: error: cannot write x.h5: No space left on device"]
    run = read_file("x.h5").runs["keep"]
    assert run.attrs["status"] == "failed" and "No space left on device" in run.attrs["error"]
    assert 0 < len(run.data["train/step"]) < 40
    _consistent(Path("x.h5"))
    assert not Path(".x.h5.lock").exists()


def test_a_write_that_fails_in_hdf5_marks_the_run_failed(in_tmp: Path, tiny_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """h5py reports a failed write as RuntimeError or OSError: one line, exit 2, the records flushed before kept."""
    resize = h5py.Dataset.resize
    calls = []

    def failing_resize(self: h5py.Dataset, *args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 23:  # once, mid-flush: taking the flush back resizes again
            raise RuntimeError(
                "Unable to synchronously flush file (file write failed: errno = 28, error message = 'No space left on device')"
            )
        resize(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "resize", failing_resize)
    result = runner.invoke(app, ["train", str(tiny_config), "--steps", "40", "--flush-every", "2", "-o", "x.h5"])
    assert result.exit_code == 2, result.output
    assert _error_lines(result.output) == ["bnprobe: error: cannot write x.h5: No space left on device"]
    monkeypatch.setattr(h5py.Dataset, "resize", resize)
    run = read_file("x.h5").runs["keep"]
    assert run.attrs["status"] == "failed" and len(run.data["train/step"]) > 0
    _consistent(Path("x.h5"))  # the flush that failed half-way was taken back


def test_a_disk_full_before_the_start_leaves_nothing(in_tmp: Path, tiny_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for writes, force in ((0, False), (1, False), (1, True)):
        _disk_fills_after(monkeypatch, writes)
        if force:
            Path("x.h5").write_bytes(b"precious results")
        result = runner.invoke(app, ["train", str(tiny_config), "-o", "x.h5", *(["--force"] if force else [])])
        assert result.exit_code == 2, result.output
        assert _error_lines(result.output) in (
            ["bnprobe: error: cannot create x.h5: No space left on device"],
            ["bnprobe: error: cannot write x.h5: No space left on device"],
        )
        expected = ["tiny.yaml", "x.h5"] if force else ["tiny.yaml"]
        assert sorted(p.name for p in in_tmp.iterdir()) == expected, writes
    assert Path("x.h5").read_bytes() == b"precious results"


def _fill(disk: Path) -> None:
    """Write zeros to ``disk`` until it is full, as another program might (the run may have filled
    it already: then even creating the file fails)."""
    try:
        with open(disk / "filler", "wb") as fh:
            while True:
                fh.write(bytes(1 << 16))
                fh.flush()
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise


def _steps_in(path: Path) -> int:
    """Training steps flushed to ``path`` so far (0 while there is no file, or it is mid-flush)."""
    try:
        return len(read_file(path).runs["keep"].data["train/step"])
    except Exception:  # noqa: BLE001 - not there yet, or the writer is mid-flush
        return 0


# bnprobe's command line with no check of free space: HDF5 meets the full disk mid-write
_UNCHECKED = "import sys, bnprobe.store.guard as g, bnprobe.cli as c; g.free_bytes = lambda _d: 1 << 40; sys.argv[0] = 'bnprobe'; c.main()"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0, reason="mounting a small tmpfs needs root on Linux")
@pytest.mark.parametrize("command", [["-m", "bnprobe.cli"], ["-c", _UNCHECKED]], ids=["checked", "hdf5-meets-it"])
def test_a_real_disk_filling_mid_run_gives_one_line_and_a_file_that_opens(tmp_path: Path, tiny_config: Path, command: list[str]) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        # histograms of 2,048 bins make each record a chunk of its own, so the next flush after the
        # disk fills needs new space (scalar records fill 1,024-row chunks: many steps later)
        args = ["train", str(tiny_config), "--steps", "100000", "--flush-every", "2", "-o", str(disk / "x.h5")]
        args += ["--set", "probes.moments.histogram_bins=2048"]
        proc = subprocess.Popen([sys.executable, *command, *args], env=env, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 120
            while _steps_in(disk / "x.h5") < 4:
                assert proc.poll() is None and time.time() < deadline, "no records appeared"
                time.sleep(0.2)
            _fill(disk)
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 2, err
        assert _error_lines(err) == [f"bnprobe: error: cannot write {disk / 'x.h5'}: No space left on device"], err
        assert "Traceback" not in err
        run = read_file(disk / "x.h5").runs["keep"]
        assert run.attrs["status"] == "failed" and len(run.data["train/step"]) >= 4
        _read_consistently(disk / "x.h5")
        assert not (disk / ".x.h5.lock").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ----------------------------------------------------------------------------- not a regular file


def test_force_never_replaces_what_is_not_a_regular_file(in_tmp: Path, tiny_config: Path) -> None:
    run_experiment(load_config(tiny_config, {"steps": 2, "output": "r.h5"}))
    os.mkfifo("pipe")
    for args in (["export", "r.h5", "-o", "pipe", "--force"], ["train", str(tiny_config), "-o", "pipe", "--force"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert _error_lines(result.output) == [
            "bnprobe: error: pipe is not a regular file (a device, pipe or socket); choose another --output"
        ]
        assert Path("pipe").is_fifo()


# ----------------------------------------------------------------------------- a second interrupt


def test_signals_wait_for_the_end_of_a_write() -> None:
    # Python's own Ctrl-C handler, whatever this process inherited (a shell's background job starts
    # with SIGINT ignored, and an ignored signal raises nothing)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), signals_deferred():
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.05)  # the handler would run here, were it not deferred
            reached_the_end = True
        assert reached_the_end
        with signals_deferred(), signals_deferred():
            pass  # nothing received: nothing raised
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_during_the_cleanup_leaves_a_consistent_file(
    in_tmp: Path, tiny_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first Ctrl-C stops the run at a step boundary; a second one, during the cleanup that
    follows (flush, checkpoint, status), waits for that cleanup: the file agrees with itself, says
    ``interrupted``, and resumes to the records of an uninterrupted run."""
    import bnprobe.trainer as trainer
    from bnprobe.recorder import Recorder

    settings = {"steps": 12, "flush_every": 3, "checkpoint_every": 4}
    run_experiment(load_config(tiny_config, {**settings, "output": "full.h5"}))
    finish, record = trainer._Run.finish, Recorder.step

    def finish_after_a_second_ctrl_c(self: trainer._Run, *args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        finish(self, *args, **kwargs)

    def step_then_ctrl_c_at_7(self: Recorder, *args: Any, **kwargs: Any) -> None:
        record(self, *args, **kwargs)
        if self.step_index == 7:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(trainer._Run, "finish", finish_after_a_second_ctrl_c)
    monkeypatch.setattr(Recorder, "step", step_then_ctrl_c_at_7)
    args = ["train", str(tiny_config), *(f"--{k.replace('_', '-')}={v}" for k, v in settings.items()), "-o", "x.h5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    run = read_file("x.h5").runs["keep"]
    assert run.attrs["status"] == "interrupted" and run.data["train/step"].tolist() == list(range(7))
    _consistent(Path("x.h5"))
    with h5py.File("x.h5", "r") as h5:
        assert h5["runs/keep/checkpoint"].attrs["step"] == 7
    monkeypatch.setattr(trainer._Run, "finish", finish)
    monkeypatch.setattr(Recorder, "step", record)
    assert runner.invoke(app, ["train", "--resume", "x.h5"]).exit_code == 0
    resumed, uninterrupted = read_file("x.h5").runs["keep"], read_file("full.h5").runs["keep"]
    for key in uninterrupted.data:
        if not key.endswith("seconds"):
            np.testing.assert_array_equal(uninterrupted.data[key], resumed.data[key], err_msg=key)
