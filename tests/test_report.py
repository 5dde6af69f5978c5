"""report.build_report / render_report: numbers equal the file's, 80 columns, missing data, bad files."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from _benchmarks import load_benchmark
from _fixtures import write_run_file
from rich.console import Console

from bnprobe.errors import BnprobeError, ConfigError, StoreError
from bnprobe.report import _SECTIONS, SERIES_POINTS, SPARK_BLOCKS, STAT_CHOICES, align_layers, build_report, fmt, render_report, sparkline
from bnprobe.store import HELDOUT, SECTIONS, STATS, TRAIN, Store, load_columns, read_file, scan, strings

GOLDEN = Path(__file__).parent / "golden" / "report_80.txt"


@pytest.fixture(scope="module")
def full_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run_file(tmp_path_factory.mktemp("report") / "full.h5", hessian_blocks=True)


def _f(value: object) -> float | None:
    """What the report must hold for a stored number: itself, or None when not finite."""
    v = float(value)  # type: ignore[arg-type]
    return v if math.isfinite(v) else None


def _text(report: dict, width: int = 80) -> str:
    console = Console(width=width, record=True, no_color=True, file=io.StringIO())
    render_report(report, console)
    return console.export_text()


def _run(report: dict, name: str, index: int = 0) -> dict:
    return report["files"][index]["runs"][name]


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("numbers", [1, scan.SLICE_NUMBERS])  # read a record (a column) at a time, or all at once
def test_every_number_equals_the_file(full_file: Path, monkeypatch: pytest.MonkeyPatch, numbers: int) -> None:
    monkeypatch.setattr(scan, "SLICE_NUMBERS", numbers)
    report = build_report([full_file])
    json.dumps(report, allow_nan=False)  # plain JSON, no NaN
    with h5py.File(full_file, "r") as h5:
        assert set(report["files"][0]["runs"]) == set(h5["runs"])
        for name, g in h5["runs"].items():
            run = _run(report, name)
            s = run["summary"]
            assert s["status"] == g.attrs["status"] == "finished"
            assert s["steps"] == int(g.attrs["steps"])
            assert s["seconds"] == float(g.attrs["seconds"])
            assert s["final_loss"] == float(g["train/loss"][-1])
            assert s["final_accuracy"] == float(g["train/accuracy"][-1])
            assert s["last_step"] == int(g["train/step"][-1])
            assert (s["model"], s["bn"], s["seed"]) == (g.attrs["model"], g.attrs["bn"], int(g.attrs["seed"]))

            names = [n.decode() if isinstance(n, bytes) else n for n in g["layers"]["name"]]
            m = run["moments"]
            assert m["records"] == len(g["moments/step"])
            assert m["steps"] == g["moments/step"][()].tolist()
            assert [lay["name"] for lay in m["layers"]] == names
            for j, layer in enumerate(m["layers"]):
                for which, row in (("first", 0), ("last", -1)):
                    for stat in ("mean", "p15", "p50", "p85"):
                        assert layer[which][stat] == float(g[f"moments/{stat}"][row, j])
                    assert layer[which]["std"] == pytest.approx(math.sqrt(float(g["moments/var"][row, j])), rel=1e-12)
                assert layer["series"] == [float(v) for v in g["moments/mean"][:, j]]

            ics_names = [n.decode() if isinstance(n, bytes) else n for n in g["ics/layer"][()]]
            assert [lay["name"] for lay in run["ics"]["layers"]] == ics_names
            for j, layer in enumerate(run["ics"]["layers"]):
                assert layer["median_l2"] == pytest.approx(float(np.median(g["ics/l2"][:, j].astype(np.float64))), rel=1e-12)
                assert layer["median_cosine"] == pytest.approx(float(np.median(g["ics/cosine"][:, j].astype(np.float64))), rel=1e-12)
            assert run["ics"]["records"] == len(g["ics/step"])

            land = run["landscape"]
            loss, grad, beta, eta = (g[f"landscape/{k}"][()] for k in ("loss", "grad_l2", "beta_smoothness", "eta"))
            assert land["loss_min"] == float(loss.min()) and land["loss_max"] == float(loss.max())
            assert land["grad_l2_min"] == float(grad.min()) and land["grad_l2_max"] == float(grad.max())
            assert land["beta_median"] == pytest.approx(float(np.median(beta)), rel=1e-12)
            assert land["beta_max"] == float(beta.max())
            assert (land["eta_min"], land["eta_max"], land["etas"]) == (float(eta.min()), float(eta.max()), len(eta))
            assert land["loss_spread_median"] == pytest.approx(float(np.median(loss.max(1) - loss.min(1))), rel=1e-12)
            assert land["grad_l2_spread_median"] == pytest.approx(float(np.median(grad.max(1) - grad.min(1))), rel=1e-12)

            h = run["hessian"]
            assert h["top_eigenvalue"] == float(g["hessian/top_eigenvalue"][-1])
            assert h["iterations"] == int(g["hessian/iterations"][-1])
            assert h["residual"] == float(g["hessian/residual"][-1])
            assert h["converged"] is bool(g["hessian/converged"][-1])
            assert h["last_step"] == int(g["hessian/step"][-1])
            assert h["bn_mode"] == g["hessian/top_eigenvalue"].attrs["bn_mode"]
            assert h["samples"] == int(g["hessian/top_eigenvalue"].attrs["samples"])
            blocks = [b.decode() for b in g["hessian/block"][()]]
            assert h["blocks"] == dict(zip(blocks, g["hessian/block_top_eigenvalue"][-1].tolist())) and len(blocks) == 4


@pytest.mark.parametrize("stat", ["p85", "std", "zero_fraction"])
def test_stat_picks_the_sparkline_series(full_file: Path, stat: str) -> None:
    report = build_report([full_file], stat=stat)
    with h5py.File(full_file, "r") as h5:
        layer = _run(report, "keep")["moments"]["layers"][1]
        stored = h5["runs/keep/moments/var"][:, 1] if stat == "std" else h5[f"runs/keep/moments/{stat}"][:, 1]
        expected = [math.sqrt(float(v)) for v in stored] if stat == "std" else [float(v) for v in stored]
    assert layer["series"] == pytest.approx(expected, rel=1e-12)


def test_a_long_run_s_sparkline_holds_bin_means_and_its_scale_every_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More records than a sparkline keeps: each point is the mean of an even run of records (bins
    straddling the slices the records are read in), the scale is over every record, and the first
    and last record are read as they are."""
    monkeypatch.setattr(scan, "SLICE_NUMBERS", 64)
    path = load_benchmark("export_large").build(tmp_path / "long.h5", 5, 1000)
    m = _run(build_report([path]), "long")["moments"]
    with h5py.File(path, "r") as h5:
        mean, steps = h5["runs/long/moments/mean"][()], h5["runs/long/moments/step"][()]
    bins = np.array_split(np.arange(1000), SERIES_POINTS)
    assert m["records"] == 1000 and m["steps"] == [int(steps[b[0]]) for b in bins]
    for j, layer in enumerate(m["layers"]):
        assert layer["series"] == pytest.approx([mean[b, j].astype(np.float64).mean() for b in bins], rel=1e-12)
        assert (layer["low"], layer["high"]) == (float(mean[:, j].min()), float(mean[:, j].max()))
        assert (layer["first"]["mean"], layer["last"]["mean"]) == (float(mean[0, j]), float(mean[-1, j]))


@pytest.mark.parametrize("records", [8, 2 * SERIES_POINTS + 1])
def test_a_statistic_the_run_did_not_record_is_a_blank_sparkline(tmp_path: Path, records: int) -> None:
    path = load_benchmark("export_large").build(tmp_path / "f.h5", 3, records)
    with h5py.File(path, "r+") as h5:
        del h5["runs/long/moments/zero_fraction"]
        steps = h5["runs/long/moments/step"][()]
    m = _run(build_report([path], stat="zero_fraction"), "long")["moments"]
    bins = np.array_split(np.arange(records), min(records, SERIES_POINTS))
    assert m["steps"] == [int(steps[b[0]]) for b in bins]
    assert all(lay["series"] == [None] * len(bins) and lay["low"] is lay["high"] is None for lay in m["layers"])


def test_layers_glob_and_variant_filter(full_file: Path) -> None:
    report = build_report([full_file], layers="fc*,out", variant="keep,ins*")
    runs = report["files"][0]["runs"]
    assert list(runs) == ["keep", "insert"]
    assert [lay["name"] for lay in runs["insert"]["moments"]["layers"]] == ["fc1", "fc2", "fc3", "out"]
    assert [lay["name"] for lay in runs["keep"]["ics"]["layers"]] == ["fc1", "fc2", "fc3", "out"]
    only_bn = build_report([full_file], layers="bn*")
    assert [lay["name"] for lay in _run(only_bn, "keep")["moments"]["layers"]] == []
    assert [lay["name"] for lay in _run(only_bn, "noisy")["moments"]["layers"]] == ["bn1", "bn2", "bn3"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"stat": "median"}, "choose from " + ", ".join(STAT_CHOICES)),
        ({"variant": "strip"}, "choose from keep, insert, noisy"),
        ({"layers": "features.*"}, "matches no layer; layers: fc1, bn1, fc2"),
    ],
)
def test_unknown_choices_are_one_line_config_errors(full_file: Path, kwargs: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)) as info:
        build_report([full_file], **kwargs)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- incomplete files


def test_interrupted_run_is_reported(tmp_path: Path) -> None:
    path = write_run_file(tmp_path / "crashed.h5", variants=("keep", "insert"), status=None, steps=23)
    report = build_report([path])
    with h5py.File(path, "r") as h5:
        for name in ("keep", "insert"):
            s = _run(report, name)["summary"]
            assert s["status"] == "running"
            assert "steps" not in h5[f"runs/{name}"].attrs
            assert s["steps"] == int(h5[f"runs/{name}/train/step"][-1]) + 1 == 23
            assert s["seconds"] == float(h5[f"runs/{name}/train/seconds"][-1])
            assert s["final_loss"] == float(h5[f"runs/{name}/train/loss"][-1])
    text = _text(report)
    assert "status running: the run did not finish" in text


def test_missing_optional_groups_are_skipped_with_a_hint(tmp_path: Path) -> None:
    path = write_run_file(tmp_path / "train_only.h5", variants=("keep",), sections=("train",), regression=True)
    report = build_report([path])
    run = _run(report, "keep")
    assert run["moments"] is None and run["ics"] is None and run["landscape"] is None and run["hessian"] is None
    assert run["summary"]["final_accuracy"] is None  # NaN in the file: a regression run
    json.dumps(report, allow_nan=False)
    text = _text(report)
    assert "Activation moments: not recorded" in text
    assert "Gradient-shift ICS: not recorded (run bnprobe measure-ics" in text
    assert "Loss landscape: not recorded" in text
    assert "Top Hessian eigenvalue: not recorded" in text


def test_some_variants_missing_a_section(tmp_path: Path) -> None:
    a = write_run_file(tmp_path / "a.h5", variants=("keep",), sections=("train", "moments"))
    b = write_run_file(tmp_path / "b.h5", variants=("keep",), sections=("train", "ics"), seed=1)
    report = build_report([a, b])
    assert _run(report, "keep", 0)["ics"] is None and _run(report, "keep", 1)["ics"] is not None
    assert [r["label"] for f in report["files"] for r in f["runs"].values()] == ["a:keep", "b:keep"]
    text = _text(report)
    assert "b:keep: no moments recorded" in text
    assert "a:keep: no ICS recorded" in text
    assert "Gradient-shift ICS" in text


def test_diverged_run_and_variant_absent_from_one_file(full_file: Path, tmp_path: Path) -> None:
    path = write_run_file(tmp_path / "div.h5", variants=("keep", "strip"), status="diverged", steps=10)
    report = build_report([full_file, path], variant="strip")
    assert report["files"][0]["runs"] == {}
    s = report["files"][1]["runs"]["strip"]["summary"]
    assert (s["status"], s["diverged_step"]) == ("diverged", 9)
    text = _text(report)
    assert "diverged at 9" in text
    assert "no run matches --variant strip; runs: keep, insert, noisy" in text


def test_run_with_bare_attributes(tmp_path: Path) -> None:
    """A run written by a user's own loop: no model/seed/device attributes, only a loss."""
    path = tmp_path / "bare.h5"
    store = Store.create(path, "")
    writer = store.run("run", {})
    for step in range(5):
        writer.append("train", step, {"loss": 1.0 / (step + 1)})
    store.close()
    report = build_report([path])
    s = _run(report, "run")["summary"]
    assert (s["model"], s["seed"], s["final_loss"], s["final_accuracy"], s["steps"]) == ("", None, 0.2, None, 5)
    json.dumps(report, allow_nan=False)
    text = _text(report)
    assert "None" not in text and "running" in text


def test_file_without_runs(tmp_path: Path) -> None:
    path = tmp_path / "empty.h5"
    Store.create(path, "").close()
    report = build_report([path])
    assert report["files"][0]["runs"] == {}
    assert "no runs recorded" in _text(report)


def test_not_a_bnprobe_file(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5["x"] = np.arange(3)
    with pytest.raises(StoreError, match="not a bnprobe file"):
        build_report([path])
    text = tmp_path / "notes.h5"
    text.write_text("hello\n")
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        build_report([text])
    with pytest.raises(StoreError, match="does not exist"):
        build_report([tmp_path / "missing.h5"])


def test_truncated_file(full_file: Path, tmp_path: Path) -> None:
    data = full_file.read_bytes()
    for fraction in (0.1, 0.6, 0.97):
        cut = tmp_path / f"cut{fraction}.h5"
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(StoreError, match=r"is not a readable HDF5 file \(truncated") as info:
            build_report([cut])
        assert "\n" not in str(info.value)
        assert isinstance(info.value, BnprobeError)


# ----------------------------------------------------------------------------- rendering


def test_render_fits_80_columns(full_file: Path, tmp_path: Path) -> None:
    text = _text(build_report([full_file]))
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    assert all(v in text for v in ("insert", "keep", "noisy", "Activation moments", "Gradient-shift ICS", "Loss landscape", "Top Hessian"))
    assert any(ch in text for ch in "▁▂▃▄▅▆▇█")
    assert "\x1b[" not in text
    # two files of three variants each, long layer names: six columns fold into several tables
    other = write_run_file(tmp_path / "other_run_with_a_long_name.h5", seed=3, steps=400, record_every=4)
    long_series = _text(build_report([other]))
    assert max(map(len, long_series.splitlines())) <= 80
    spark_lines = [line.strip() for line in long_series.splitlines() if line.strip() and set(line.strip()) <= set("▁▂▃▄▅▆▇█ ")]
    assert len(spark_lines) == 7  # one per layer row (fc1 bn1 fc2 bn2 fc3 bn3 out): none folded
    assert min(map(len, spark_lines)) >= 12
    wide = _text(build_report([full_file, other]))
    assert max(map(len, wide.splitlines())) <= 80
    assert wide.count("Activation moments") >= 2
    assert "other_run_with_a_long_name:noisy" in wide


def test_render_narrow_and_no_color_env(full_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    console = Console(width=60, record=True, file=io.StringIO(), force_terminal=True)
    render_report(build_report([full_file]), console)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b[3" not in out  # no foreground colours
    assert max(map(len, console.export_text().splitlines())) <= 60


def test_render_matches_golden(full_file: Path) -> None:
    """The 80-column rendering of a fixed file; regenerate with BNPROBE_REGOLD=1."""
    text = _text(build_report([full_file]))
    lines = text.splitlines()
    body = "\n".join(lines[lines.index(next(lay for lay in lines if lay.startswith("Runs"))) :])  # after path and time
    if os.environ.get("BNPROBE_REGOLD"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(body + "\n", encoding="utf-8")
    assert body + "\n" == GOLDEN.read_text(encoding="utf-8")


def test_layers_renamed_by_surgery_share_a_row(tmp_path: Path) -> None:
    path = write_run_file(tmp_path / "renamed.h5", variants=("keep", "insert"), surgery_names=True)
    report = build_report([path])
    assert [lay["name"] for lay in _run(report, "insert")["moments"]["layers"]][:2] == ["fc1.linear", "fc1.bn"]
    text = _text(report)
    assert max(map(len, text.splitlines())) <= 80
    rows = [line.split()[0] for line in text.splitlines() if line[:1].strip() and line.split()[0].startswith("fc")]
    assert rows.count("fc1") == 2  # one row in the moments table, one in the ICS table
    assert "fc1.linear" not in rows and "fc1.bn" in rows
    assert "layers renamed by BN surgery are shown in the row of their original name (fc1.linear as fc1)" in " ".join(text.split())


def test_align_layers() -> None:
    maps = align_layers(
        [
            [("features.0", "conv"), ("features.3", "conv"), ("classifier", "linear")],
            [("features.0.conv", "conv"), ("features.0.bn", "norm"), ("features.3.conv", "conv"), ("classifier", "linear")],
        ]
    )
    assert maps[0] == {"features.0": "features.0", "features.3": "features.3", "classifier": "classifier"}
    assert maps[1] == {
        "features.0.conv": "features.0",
        "features.0.bn": "features.0.bn",
        "features.3.conv": "features.3",
        "classifier": "classifier",
    }
    # a child of another kind, or a name its own column already has, is not merged
    assert align_layers([[("a", "conv")], [("a", "conv"), ("a.b", "conv")]])[1] == {"a": "a", "a.b": "a.b"}


def test_sparkline_and_fmt() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8) == "▁▂▃▄▅▆▇█"
    assert sparkline([1.0, None, 1.0], 3) == "▄ ▄"
    ramp = sparkline(list(range(100)), 10)
    assert len(ramp) == 10 and ramp[0] == "▁" and ramp[-1] == "█"
    assert [SPARK_BLOCKS.index(c) for c in ramp] == sorted(SPARK_BLOCKS.index(c) for c in ramp)
    assert sparkline([0.5], 4, lo=0.0, hi=1.0) in ("▄", "▅")
    assert sparkline([], 5) == ""
    assert sparkline([0.03000, 0.03001], 2) == "▄▄"  # equal to 0.1%: flat, not a full swing
    assert sparkline([0.030, 0.031], 2) == "▁█"
    assert fmt(None) == "—" and fmt(3) == "3" and fmt(0.123456) == "0.123" and fmt(1.5e-7) == "1.50e-07"


def test_stats_names_cover_the_file_layout() -> None:
    assert set(STATS) <= set(STAT_CHOICES)


def test_an_unconverged_hessian_is_flagged(tmp_path: Path) -> None:
    path = write_run_file(tmp_path / "h.h5", variants=("keep",), sections=("train", "hessian"))
    assert "not converged" not in _text(build_report([path]))
    with h5py.File(path, "r+") as f:
        f["runs/keep/hessian/converged"][-1] = False
    text = _text(build_report([path]))
    assert re.search(r"converged +NO", text) and "not converged: raise probes.hessian.max_iter" in text


def test_files_with_the_same_name_get_distinct_labels(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = write_run_file(tmp_path / "a" / "run.h5", variants=("keep",), sections=("train",))
    two = write_run_file(tmp_path / "b" / "run.h5", variants=("keep",), sections=("train",), seed=1)
    other = write_run_file(tmp_path / "other.h5", variants=("keep",), sections=("train",))
    _, columns = load_columns([one, two])
    assert [c.label for c in columns] == ["a/run:keep", "b/run:keep"]
    _, columns = load_columns([one, other])
    assert [c.label for c in columns] == ["run:keep", "other:keep"]
    _, columns = load_columns([one, one])
    assert [c.label for c in columns] == ["run#1:keep", "run#2:keep"]


def test_every_section_but_train_and_heldout_has_a_renderer() -> None:
    """Training and held-out records are shown in the runs table, not in sections of their own."""
    assert [s.key for s in _SECTIONS] == [s for s in SECTIONS if s not in (TRAIN, HELDOUT)]


# ----------------------------------------------------------------------------- start-up


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_report_command_does_not_import_torch(full_file: Path) -> None:
    done = _python(
        "import sys\n"
        f"sys.argv = ['bnprobe', 'report', {str(full_file)!r}]\n"
        "from bnprobe.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    assert done.returncode == 0, done.stderr
    assert "Activation moments" in done.stdout and "Top Hessian eigenvalue" in done.stdout


def test_reading_modules_import_neither_torch_nor_the_probes() -> None:
    done = _python(
        "import sys, bnprobe.report, bnprobe.export, bnprobe.plot\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('bnprobe.probes')]\n"
        "assert not bad, bad\n"
    )
    assert done.returncode == 0, done.stderr


def test_the_spectrum_section_shows_the_last_record(tmp_path: Path) -> None:
    path = write_run_file(tmp_path / "s.h5", variants=("keep", "insert"), spectrum=True)
    report = build_report([path])
    run = read_file(path).runs["insert"]
    spec = _run(report, "insert")["spectrum"]
    assert spec is not None and spec["records"] == len(run.data["spectrum/step"]) and spec["last_step"] == run.data["spectrum/step"][-1]
    assert spec["top_k"] == pytest.approx(run.data["spectrum/top_k"][-1].tolist())
    assert spec["trace"] == pytest.approx(run.data["spectrum/trace"][-1]) and spec["trace_stderr"] == pytest.approx(
        run.data["spectrum/trace_stderr"][-1]
    )
    block = strings(run.data["spectrum/block"])[1]
    assert spec["blocks"][block] == pytest.approx(
        (run.data["spectrum/block_top_eigenvalue"][-1, 1], run.data["spectrum/block_trace"][-1, 1])
    )
    text = " ".join(_text(report).split())
    keep = _run(report, "keep")["spectrum"]
    assert keep is not None and "Hessian spectrum (last record)" in text
    assert f"λ1 {fmt(keep['top_k'][0], 4)} {fmt(spec['top_k'][0], 4)}" in text
    assert f"{fmt(spec['trace'], 4)} ± {fmt(spec['trace_stderr'], 2)}" in text and f"λ1 / tr {block}" in text
