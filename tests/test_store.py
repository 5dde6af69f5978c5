"""HDF5 round trip, never overwriting, and clear errors for files that are not ours."""

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _fixtures import write_run_file

from bnprobe.errors import StoreError
from bnprobe.layers import LayerInfo
from bnprobe.store import (
    AXES_ATTR,
    ICS_FIELDS,
    LAYOUT,
    STATS,
    Status,
    Store,
    atomic_output,
    axes_for,
    load_checkpoint,
    read_file,
    spec_of,
)

LAYERS = [LayerInfo("a", "conv", 10, (2, 3), 0), LayerInfo("b.c", "linear", 4, (2,), 1)]


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    with Store.create(path, "lr: 0.1\n") as store:
        w = store.run("keep", {"bn": "keep", "seed": 3})
        w.set_layers(LAYERS)
        for step in range(5):
            w.append("moments", step, {"mean": np.array([step, -step], dtype=np.float32)})
        w.write_constant("landscape/eta", [0.1, 0.2])
        w.save_checkpoint({"w": torch.arange(3)}, step=5)
        w.set_status("finished", steps=5)
    data = read_file(path)
    assert data.attrs["config"] == "lr: 0.1\n" and data.attrs["format_version"] == 1
    run = data.runs["keep"]
    assert run.attrs["status"] == "finished" and run.attrs["seed"] == 3 and run.layer_names == ["a", "b.c"]
    assert run.layers[0]["output_shape"] == "2x3"
    np.testing.assert_array_equal(run.data["moments/step"], np.arange(5))
    np.testing.assert_array_equal(run.data["moments/mean"][:, 1], -np.arange(5))
    with h5py.File(path) as f:  # resizable and chunked, so records can be appended
        ds = f["runs/keep/moments/mean"]
        assert ds.maxshape == (None, 2) and ds.chunks is not None
    state, step = load_checkpoint(path, "keep")
    assert step == 5 and state["w"].tolist() == [0, 1, 2]


def test_flushed_records_survive_without_close(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "x.h5")
    w = store.run("r", {})
    for step in range(7):
        w.append("train", step, {"loss": 1.0})
        if step == 5:
            w.flush()
    # not closed: records 0-5 were flushed, 6 is still buffered
    assert list(read_file(tmp_path / "x.h5").runs["r"].data["train/step"]) == [0, 1, 2, 3, 4, 5]
    assert read_file(tmp_path / "x.h5").runs["r"].attrs["status"] == "running"
    store.close()


def test_never_overwrites_without_force(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    path.write_bytes(b"precious")
    with pytest.raises(StoreError, match="already exists"):
        Store.create(path)
    assert path.read_bytes() == b"precious"


def test_force_replaces_only_at_first_flush(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    path.write_bytes(b"old")
    store = Store.create.__func__(Store, path, force=True)  # type: ignore[attr-defined]
    store.close()
    assert read_file(path).attrs["format_version"] == 1
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("where", ["missing/dir/x.h5"])
def test_missing_output_directory(tmp_path: Path, where: str) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store.create(tmp_path / where)


def test_not_a_bnprobe_file(tmp_path: Path) -> None:
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        read_file(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1]
    with pytest.raises(StoreError, match="not a bnprobe file"):
        read_file(tmp_path / "other.h5")
    with pytest.raises(StoreError, match="is a directory"):
        read_file(tmp_path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    with Store.create(path) as store:
        w = store.run("r", {})
        w.append("train", 0, {"loss": np.zeros(1000)})
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(StoreError, match=r"is not a readable HDF5 file \(truncated"):
        read_file(path)


def test_an_error_before_any_record_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    with pytest.raises(ValueError, match="a user error found late"), Store.create(path) as store:
        store.run("r", {}).set_attrs(model="m")
        raise ValueError("a user error found late")
    assert not path.exists()
    with pytest.raises(ValueError, match="a crash mid-run"), Store.create(path) as store:  # once a step is logged, the file stays
        w = store.run("r", {})
        w.append("train", 0, {"loss": 1.0})
        raise ValueError("a crash mid-run")
    assert read_file(path).runs["r"].data["train/loss"].tolist() == [1.0]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: (f.__delitem__("runs"), f.create_dataset("runs", data=[1])), "/runs is a dataset, not a group"),
        (lambda f: (f.__delitem__("runs/r"), f.create_dataset("runs/r", data=[1])), "/runs/r is a dataset, not a group"),
        (lambda f: (f.__delitem__("runs/r/layers"), f.create_dataset("runs/r/layers", data=[1])), "/runs/r/layers is not a layers table"),
        (
            lambda f: (f.__delitem__("runs/r/train/loss"), f.create_dataset("runs/r/train/loss", data=[b"a"])),
            "/runs/r/train/loss holds object values, not numbers",
        ),
        (
            lambda f: (f.__delitem__("runs/r/moments/mean"), f.create_dataset("runs/r/moments/mean", data=[1.0])),
            r"moments/mean is 1-D, not \[records, layers\]",
        ),
    ],
)
def test_a_broken_layout_is_a_store_error(tmp_path: Path, edit: object, message: str) -> None:
    path = tmp_path / "run.h5"
    with Store.create(path) as store:
        writer = store.run("r", {})
        writer.set_layers(LAYERS)
        writer.append("train", 0, {"loss": 1.0})
        writer.append("moments", 0, {"mean": np.zeros(2)})
    with h5py.File(path, "r+") as f:
        edit(f)  # type: ignore[operator]
    with pytest.raises(StoreError, match=message):
        read_file(path)


def test_an_output_name_too_long_fails_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"cannot write .*: File name too long"):
        Store.create(tmp_path / "runs" / ("x" * 250 + ".h5"), create_parent=True)
    assert list(tmp_path.iterdir()) == []  # the runs/ it made is gone too


# ----------------------------------------------------------------------------- the layout as a table


def _axes_attrs(path: Path) -> dict[str, list[str]]:
    """Every dataset's ``axes`` attribute in run ``keep``, straight from h5py."""
    found: dict[str, list[str]] = {}
    with h5py.File(path, "r") as f:
        f["runs/keep"].visititems(
            lambda rel, obj: found.__setitem__(rel, [str(a) for a in obj.attrs[AXES_ATTR]]) if AXES_ATTR in obj.attrs else None
        )
    return found


def test_new_datasets_carry_their_axis_labels(tmp_path: Path) -> None:
    path = write_run_file(tmp_path / "x.h5", per_channel=True, histogram_bins=3, hessian_blocks=True)
    found = _axes_attrs(path)
    expected = {
        "train/step": ["record"],
        "train/loss": ["record"],
        "moments/mean": ["record", "layer"],
        "moments/histogram": ["record", "layer", "bin"],
        "moments/per_channel/fc1/p85": ["record", "channel"],
        "ics/layer": ["layer"],
        "ics/l2": ["record", "layer"],
        "landscape/eta": ["eta"],
        "landscape/loss": ["record", "eta"],
        "landscape/beta_smoothness": ["record"],
        "hessian/block": ["block"],
        "hessian/block_top_eigenvalue": ["record", "block"],
        "hessian/converged": ["record"],
    }
    assert {k: found.get(k) for k in expected} == expected
    with h5py.File(path, "r") as f:  # every dataset of every section has them, one label per axis
        datasets: list[tuple[str, int]] = []
        f["runs/keep"].visititems(lambda rel, obj: datasets.append((rel, obj.ndim)) if isinstance(obj, h5py.Dataset) else None)
    assert {rel for rel, _ in datasets} - set(found) == {"layers"}
    assert all(len(found[rel]) == ndim for rel, ndim in datasets if rel != "layers")


def test_files_without_axis_labels_read_the_same(tmp_path: Path) -> None:
    """Files written before the ``axes`` attribute: readers take the labels from the layout table."""
    path = write_run_file(tmp_path / "new.h5", per_channel=True, histogram_bins=3, hessian_blocks=True)
    old = tmp_path / "old.h5"
    shutil.copy(path, old)
    with h5py.File(old, "r+") as f:
        f.visititems(lambda _, obj: obj.attrs.__delitem__(AXES_ATTR) if AXES_ATTR in obj.attrs else None)
    assert _axes_attrs(old) == {} and _axes_attrs(path)
    new_runs, old_runs = read_file(path).runs, read_file(old).runs
    for name, run in new_runs.items():
        other = old_runs[name]
        assert {k: other.axes(k) for k in other.data} == {k: run.axes(k) for k in run.data}
        assert [(r.section, r.quantity, r.axes, dict(r.fixed)) for r in other.records()] == [
            (r.section, r.quantity, r.axes, dict(r.fixed)) for r in run.records()
        ]


def test_the_files_own_axis_labels_win(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    with Store.create(path) as store:
        w = store.run("r", {})
        w.append("extra", 0, {"x": np.arange(3.0)})  # a section the layout does not know: no attribute
    assert read_file(path).runs["r"].axes("extra/x") == ("record", "channel")
    with h5py.File(path, "r+") as f:
        f["runs/r/extra/x"].attrs[AXES_ATTR] = ["record", "bin"]
    assert read_file(path).runs["r"].axes("extra/x") == ("record", "bin")


def test_layout_lookup() -> None:
    assert spec_of("moments/mean") is not None and spec_of("layers") is None
    assert axes_for("moments/per_channel/features.0/p85", 2) == ("record", "channel")
    assert axes_for("hessian/block_top_eigenvalue", 2) == ("record", "block")
    assert axes_for("hessian/top_eigenvalue", 1) == ("record",)
    assert axes_for("moments/mean", 1) is None  # the shape does not fit
    assert axes_for("elsewhere/x", 2) == ("record", "channel")
    assert all(spec.axes for spec in LAYOUT)
    from bnprobe.probes.ics import FIELDS, ICS
    from bnprobe.probes.moments import STATS as PROBE_STATS

    assert PROBE_STATS is STATS and FIELDS is ICS_FIELDS and set(ICS._fields) == set(ICS_FIELDS)


def test_a_reader_typo_is_an_error(tmp_path: Path) -> None:
    path = write_run_file(tmp_path / "x.h5", variants=("keep",))
    run = read_file(path).runs["keep"]
    assert run.get("moments", "mean") is not None and run.get("moments", "histogram") is None
    with pytest.raises(KeyError, match="moments/maen is not a dataset of the layout"):
        run.get("moments", "maen")


def test_status_is_a_str_enum_stored_as_its_text(tmp_path: Path) -> None:
    assert Status.FINISHED == "finished" and f"{Status.DIVERGED}" == "diverged" and Status("failed") is Status.FAILED
    path = tmp_path / "x.h5"
    with Store.create(path) as store:
        w = store.run("r", {})
        assert w._group.attrs["status"] == "running"
        w.append("train", 0, {"loss": 1.0})
        with pytest.raises(ValueError, match=r"status must be one of \('running', 'finished', 'diverged', 'interrupted', 'failed'\)"):
            w.set_status("done")
        w.set_status(Status.DIVERGED, diverged_step=0)
    with h5py.File(path, "r") as f:
        stored = f["runs/r"].attrs["status"]
    assert type(stored) is str and stored == "diverged"
    assert read_file(path).runs["r"].attrs["status"] == Status.DIVERGED


def test_atomic_output_replaces_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "o.txt"
    out.write_text("old")
    with atomic_output(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        tmp.write_text("new")
        assert out.read_text() == "old"
    assert out.read_text() == "new"
    with pytest.raises(RuntimeError, match="a bug"), atomic_output(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("a bug")
    with pytest.raises(StoreError, match=r"cannot write .*o\.txt: No space left on device"), atomic_output(out) as tmp:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")
    assert out.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["o.txt"]


def test_reading_needs_no_torch(tmp_path: Path) -> None:
    path = write_run_file(tmp_path / "x.h5", variants=("keep",), hessian_blocks=True)
    code = (
        "import sys; from bnprobe.store import read_file, load_columns; "
        f"run = read_file({str(path)!r}).runs['keep']; run.records(); load_columns([{str(path)!r}]); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_record_one_dataset_holds_beyond_its_section_is_not_read(tmp_path: Path) -> None:
    """A write the disk refused half-way (or a process killed inside one) can leave one dataset of a
    section a record longer than its step axis, or the step axis longer than the others: readers
    see only the records every dataset of the section holds."""
    path = write_run_file(tmp_path / "x.h5", variants=("keep",), histogram_bins=3)
    whole = read_file(path).runs["keep"]
    steps, mean = whole.data["moments/step"], whole.data["moments/mean"]
    with h5py.File(path, "r+") as h5:
        torn = h5["runs/keep/moments/histogram"]
        torn.resize(torn.shape[0] + 1, axis=0)
        torn[-1] = 99.0  # never whole: no step, no mean
        step_axis = h5["runs/keep/train/step"]
        step_axis.resize(step_axis.shape[0] + 1, axis=0)
    run = read_file(path).runs["keep"]
    assert run.data["moments/histogram"].shape[0] == len(steps) and not (run.data["moments/histogram"] == 99.0).any()
    assert np.array_equal(run.last("moments", "histogram"), whole.last("moments", "histogram"))
    assert run.data.shape("moments/histogram")[0] == len(steps) and run.data.shape("train/step") == whole.data.shape("train/step")
    assert np.array_equal(run.column("moments", "mean", 1), mean[:, 1])
    assert np.array_equal(run.data["train/loss"], whole.data["train/loss"])
