"""The CLI through typer's CliRunner: exit codes, one-line errors, real files."""

import functools
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from bnprobe.cli import app, format_known_exception
from bnprobe.errors import ConfigError, StoreError

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "measure-ics", "report", "export", "plot", "inspect"):
        assert command in result.output


def test_train_writes_the_file(in_tmp: Path, tiny_config: Path) -> None:
    result = runner.invoke(app, ["train", str(tiny_config)])
    assert result.exit_code == 0, result.output
    assert "finished" in result.output and "runs/tiny.h5" in result.output
    assert "mean of the last 6 steps" in result.output
    with h5py.File(in_tmp / "runs" / "tiny.h5") as f:
        run = f["runs/keep"]
        assert run.attrs["status"] == "finished"
        assert list(run["train/step"][()]) == list(range(6))
        assert run["moments/mean"].shape == (3, 9)  # steps 0, 2, 4; 8 convs + classifier


def test_cli_flags_win_over_the_config(in_tmp: Path, tiny_config: Path) -> None:
    result = runner.invoke(app, ["train", str(tiny_config), "--steps", "3", "--lr", "0.2", "--print-config"])
    assert result.exit_code == 0
    assert "steps: 3" in result.output and "lr: 0.2" in result.output
    assert not (in_tmp / "runs").exists()
    assert "  spectrum:\n    enabled: false" in result.output
    for command in ("train", "measure-ics"):
        shown = runner.invoke(app, [command, str(tiny_config), "--spectrum", "--print-config"]).output
        assert "  spectrum:\n    enabled: true" in shown, command


def test_print_config_shows_the_intervals_that_run(in_tmp: Path, tiny_config: Path) -> None:
    """The Hessian follows ICS (measure-ics: every 10 unless told), else the moments (every 2 here)."""
    trained = runner.invoke(app, ["train", str(tiny_config), "--hessian", "--print-config"]).output
    assert "  hessian:\n    enabled: true\n    every: 2\n" in trained
    measured = runner.invoke(app, ["measure-ics", str(tiny_config), "--hessian", "--print-config"]).output
    assert "  ics:\n    every: 10\n" in measured and "  hessian:\n    enabled: true\n    every: 10\n" in measured


def test_an_older_key_is_read_with_a_one_line_hint(in_tmp: Path, tiny_config: Path) -> None:
    result = runner.invoke(app, ["train", str(tiny_config), "--set", "probes.hessian_tol=1e-4", "--print-config"])
    assert result.exit_code == 0 and "    tol: 0.0001\n" in result.stdout
    assert (
        result.stderr == "bnprobe: warning: older config keys, read under their new names: probes.hessian_tol is now probes.hessian.tol\n"
    )


def test_every_option_that_sets_a_config_key_is_in_the_flag_table() -> None:
    """FLAG_KEYS is the one map from options to config keys: each command's config options are in it, and
    each key it names exists (a key that does not would be an unknown-key error at the first use)."""
    import typer.main

    from bnprobe.cli import FLAG_KEYS
    from bnprobe.config import load_config

    not_keys = {"config", "target", "bn", "force", "resume", "assignments", "print_config"}
    for command in ("train", "measure-ics", "inspect"):
        click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
        assert {p.name for p in click_command.params} - not_keys <= set(FLAG_KEYS), command
    cfg = load_config(None, {})
    for key in FLAG_KEYS.values():
        functools.reduce(getattr, key.split("."), cfg)  # an AttributeError for a key the config lacks


def test_existing_output_is_refused(in_tmp: Path, tiny_config: Path) -> None:
    (in_tmp / "out.h5").write_bytes(b"mine")
    result = runner.invoke(app, ["train", str(tiny_config), "-o", "out.h5"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "bnprobe: error: out.h5 already exists; choose another --output or pass --force to replace it"
    ]
    assert (in_tmp / "out.h5").read_bytes() == b"mine"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "vgx"], "unknown model 'vgx'; did you mean 'vgg'"),
        (["--lr", "-1"], "lr must be positive"),
        (["--batch-size", "1000"], "larger than the data set"),
        (["--data", "torchvision:CIFAR10:/no/such"], "does not exist"),
        (["--model", "mlp", "--data", "synthetic:linear"], None),
        (["-o", "no/such/dir/x.h5"], "does not exist"),
        (["-o", "{nam}.h5"], "the only placeholder is {name}"),
        (["--lr", "inf"], "lr: expected a finite number, got inf"),
        (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "not available here"),
        (["--model", "mlp", "--set", "model_options.hidden=-5"], "mlp: hidden must be an integer >= 1, got -5"),
        (["--model", "{files}/m.py:boom"], "building model '{files}/m.py:boom' failed: RuntimeError: boom"),
        (["--model", "{files}/m.py:picky"], "the model cannot run on this data in layer 'picky': want 28x28"),
        (["--model", "mlp", "--data", "npz:{files}/words.npz", "-b", "4"], "array 'y' holds <U1 scalars"),
        (["--model", "mlp", "--data", "npz:{files}/negative.npz", "-b", "4"], "class labels in 'y' must be 0, 1, 2, ...; found -1"),
    ],
)
def test_user_errors_are_one_line(in_tmp: Path, tiny_config: Path, args: list[str], message: str | None) -> None:
    files = in_tmp / "files"
    files.mkdir()
    (files / "m.py").write_text(
        "from collections import OrderedDict\n"
        "import torch.nn as nn\n"
        "def boom(num_classes):\n    raise RuntimeError('boom')\n"
        "class Picky(nn.Module):\n    def forward(self, x):\n        assert x.shape[-1] == 28, 'want 28x28'\n        return x\n"
        "def picky():\n    return nn.Sequential(OrderedDict(flat=nn.Flatten(), lin=nn.Linear(3072, 32), picky=Picky()))\n"
    )
    np.savez(files / "words.npz", x=np.zeros((8, 3)), y=np.array(["a"] * 8))
    np.savez(files / "negative.npz", x=np.zeros((8, 3)), y=-np.ones(8, dtype=np.int64))
    args = [a.replace("{files}", str(files)) for a in args]
    message = message and message.replace("{files}", str(files))
    result = runner.invoke(app, ["train", str(tiny_config), *args])
    if message is None:  # a regression MLP runs fine
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnprobe: error: ") and message in lines[0]
    assert not (in_tmp / "runs").exists() or not list((in_tmp / "runs").iterdir())


def test_shape_mismatch_names_the_layer(in_tmp: Path, tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import torch.nn as nn\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(7, 2))\n")
    result = runner.invoke(app, ["train", "--model", f"{f}:make", "--data", "synthetic:linear", "--steps", "2"])
    assert result.exit_code == 2
    assert "in layer '1'" in result.output and "10" in result.output


def test_missing_config(in_tmp: Path) -> None:
    result = runner.invoke(app, ["train", "nope.yaml"])
    assert result.exit_code == 2 and "config file nope.yaml does not exist" in result.output
    (in_tmp / "run.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    result = runner.invoke(app, ["train", "run.h5"])
    assert result.exit_code == 2 and "run file, not a config; to continue it: bnprobe train --resume run.h5" in result.output
    (in_tmp / "c.yaml").write_bytes(b"lr: \xff\xfe")
    result = runner.invoke(app, ["train", "c.yaml"])
    assert result.exit_code == 2 and "not a UTF-8 text file" in result.output


def test_measure_ics_from_config_writes_ics_and_landscape(in_tmp: Path, tiny_config: Path) -> None:
    result = runner.invoke(app, ["measure-ics", str(tiny_config), "--ics-every", "3", "--landscape", "--bn", "keep", "--bn", "insert"])
    assert result.exit_code == 0, result.output
    with h5py.File(in_tmp / "runs" / "tiny.h5") as f:
        for variant in ("keep", "insert"):
            run = f[f"runs/{variant}"]
            assert list(run["ics/step"][()]) == [0, 3]
            assert run["ics/cosine"].shape == (2, len(run["ics/layer"]))
            assert run["landscape/loss"].shape == (2, len(run["landscape/eta"]))
            loss = run["landscape/loss"][()]
            assert list(run["landscape/loss_min"][()]) == list(loss.min(1)) and list(run["landscape/loss_max"][()]) == list(loss.max(1))
        names = [n.decode() for n in f["runs/insert/ics/layer"][()]]
        assert "features.0" in names and "features.0_bn" in names  # surgery keeps the conv's name


def test_measure_ics_continues_a_finished_run_into_a_new_file(in_tmp: Path, tiny_config: Path) -> None:
    assert runner.invoke(app, ["train", str(tiny_config), "-o", "base.h5"]).exit_code == 0
    before = (in_tmp / "base.h5").read_bytes()
    result = runner.invoke(app, ["measure-ics", "base.h5", "--steps", "4", "--ics-every", "2"])
    assert result.exit_code == 0, result.output
    assert (in_tmp / "base.h5").read_bytes() == before  # only read
    with h5py.File(in_tmp / "base-ics.h5") as f:
        run = f["runs/keep"]
        assert list(run["train/step"][()]) == [6, 7, 8, 9]  # continues after the 6 trained steps
        assert list(run["ics/step"][()]) == [6, 8]
        assert run.attrs["continued_from"] == "base.h5"
    again = runner.invoke(app, ["measure-ics", "base.h5", "--steps", "4"])
    assert again.exit_code == 2 and "already exists" in again.output
    for flags, message in (
        (["--model", "mlp"], "--model cannot change when continuing"),
        (["--bn", "strip", "--set", "seed=3"], "--bn and --set seed cannot change"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--seed", "3"], "--seed cannot change when continuing"),
        (["--set", "steps=abc"], "steps: expected an integer, got 'abc'"),
    ):
        bad = runner.invoke(app, ["measure-ics", "base.h5", *flags, "-o", "other.h5"])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    assert not (in_tmp / "other.h5").exists()
    resumed = runner.invoke(app, ["train", "--resume", "base.h5", "--lr", "5"])
    assert resumed.exit_code == 2 and "drop the other options" in resumed.output
    assert (in_tmp / "base.h5").read_bytes() == before


def test_inspect_prints_the_plan(in_tmp: Path) -> None:
    result = runner.invoke(app, ["inspect", "vgg", "--bn", "insert"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "features.0_bn" in result.output and "8 inserted" in result.output
    bad = runner.invoke(app, ["inspect", "vgx"])
    assert bad.exit_code == 2 and "did you mean 'vgg'" in bad.output
    folded = runner.invoke(app, ["inspect", "vgg", "--bn", "strip", "--fold"], env={"COLUMNS": "100"})
    assert folded.exit_code == 0 and "bnprobe inspect vgg --bn strip --fold" in folded.output
    refused = runner.invoke(app, ["inspect", "vgg", "--fold"])  # --bn insert: nothing to fold
    assert refused.exit_code == 2 and refused.stderr.startswith("bnprobe: error: fold: true folds BN into the layer before it")


def test_inspect_shows_the_plan_of_a_model_whose_output_is_not_logits(in_tmp: Path) -> None:
    """A surgery plan needs no logits: a segmentation-style model returning a dict is planned."""
    Path("seg.py").write_text(
        "import torch.nn as nn\n"
        "class Seg(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 4, 3, padding=1)\n"
        "    def forward(self, x):\n"
        "        return {'out': self.conv(x).relu()}\n"
        "def make():\n"
        "    return Seg()\n"
    )
    result = runner.invoke(app, ["inspect", "seg.py:make", "--bn", "insert"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "conv.bn" in result.output and "1 inserted" in result.output


def test_a_detection_model_is_refused_in_one_line_naming_the_python_api_route(in_tmp: Path) -> None:
    result = runner.invoke(app, ["inspect", "torchvision:ssdlite320_mobilenet_v3_large", "--bn", "strip"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "is a detection model (SSD)" in result.stderr
    assert 'a module that wraps it and returns a scalar loss (docs/api.md, "Detection models")' in result.stderr


def test_report_and_export_through_the_cli(in_tmp: Path, tiny_config: Path) -> None:
    assert runner.invoke(app, ["train", str(tiny_config)]).exit_code == 0
    report = runner.invoke(app, ["report", "runs/tiny.h5", "--json"])
    assert report.exit_code == 0 and '"keep"' in report.output
    exported = runner.invoke(app, ["export", "runs/tiny.h5", "--format", "csv", "-o", "t.csv"])
    assert exported.exit_code == 0 and (in_tmp / "t.csv").read_text().startswith("variant,")
    wrong = runner.invoke(app, ["report", str(tiny_config)])
    assert wrong.exit_code == 2 and wrong.output.startswith("bnprobe: error:")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--steps", "abc"], "Invalid value for '--steps'"),
        (["trian"], "No such command 'trian'"),
        (["train", "--bogus"], "No such option: --bogus"),
        (["report"], "Missing argument 'RUN.h5'"),
    ],
)
def test_usage_errors_are_one_line(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bnprobe.cli import main

    monkeypatch.setattr(sys, "argv", ["bnprobe", *argv])
    with pytest.raises(SystemExit, match=r"^2$") as exit_info:  # str(SystemExit(2)) is its code
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("bnprobe: error: ") and message in err


def test_known_exceptions_map_to_one_line() -> None:
    assert format_known_exception(ConfigError("lr must\n   be positive")) == "bnprobe: error: lr must be positive"
    assert format_known_exception(StoreError("x" * 2000)) == "bnprobe: error: " + "x" * 248 + "..." + "x" * 248
    assert format_known_exception(typer.Abort()) == "bnprobe: aborted"
    assert format_known_exception(RuntimeError("a bug")) is None
    assert format_known_exception(KeyboardInterrupt()) is None


def test_debug_shows_tracebacks_for_one_invocation(in_tmp: Path, tiny_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["train", str(tiny_config), "--lr", "-1"]
    shown = runner.invoke(app, ["--debug", *argv])
    assert isinstance(shown.exception, ConfigError) and shown.exit_code == 1
    plain = runner.invoke(app, argv)  # --debug does not outlive its command
    assert plain.exit_code == 2 and plain.stderr == "bnprobe: error: lr must be positive\n"
    monkeypatch.setenv("BNPROBE_DEBUG", "1")
    assert isinstance(runner.invoke(app, argv).exception, ConfigError)


def test_a_bug_shows_its_traceback(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("bnprobe.cli.config_for_train", broken)
    result = runner.invoke(app, ["train"])
    assert isinstance(result.exception, ZeroDivisionError) and result.exit_code == 1 and "bnprobe: error" not in result.output


def test_no_arguments_show_the_help_once() -> None:
    result = runner.invoke(app, [])
    assert result.exit_code == 0 and result.stdout.count("Usage:") == 1 and "measure-ics" in result.stdout and not result.stderr
