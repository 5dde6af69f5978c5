"""HDF5 round trip, never overwriting, and clear errors for files that are not ours."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from bnprobe.errors import StoreError
from bnprobe.layers import LayerInfo
from bnprobe.store import Store, load_checkpoint, read_file

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
    with h5py.File(path) as f:  # resizable and chunked, as DESIGN 4 says
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
