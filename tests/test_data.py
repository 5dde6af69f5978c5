"""Data sources: deterministic synthetic sets, array files, clear errors, shared batch order."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import save_arrays
from torch.utils.data import Dataset, TensorDataset

from bnprobe.data import DataBundle, Task, batches, load_data
from bnprobe.errors import DataError
from bnprobe.store import Store


def test_synthetic_is_deterministic_and_shaped() -> None:
    a, b = load_data("synthetic:cifar10", seed=3, n=32), load_data("synthetic:cifar10", seed=3, n=32)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and a.input_shape == (3, 32, 32) and a.num_outputs == 10
    assert load_data("synthetic:mnist", n=8).input_shape == (1, 28, 28)
    lin = load_data("synthetic:linear", n=16)
    x, y = lin.train.tensors
    assert lin.task == "regression" and y.shape == (16, 10)
    a_hat = torch.linalg.lstsq(x, y).solution.T  # y = A x exactly
    assert torch.allclose(x @ a_hat.T, y, atol=1e-4)


@pytest.mark.parametrize("spec", ["synthetic:cifar10", "synthetic:mnist", "synthetic:linear"])
def test_synthetic_data_follows_the_seed_only(spec: str) -> None:
    torch.manual_seed(1)
    a = load_data(spec, seed=5, n=16).train.tensors
    torch.manual_seed(2)  # the global RNG plays no part
    b = load_data(spec, seed=5, n=16).train.tensors
    c = load_data(spec, seed=6, n=16).train.tensors
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])  # inputs and targets (labels, or A x) change


def test_synthetic_images_are_learnable_by_a_linear_probe() -> None:
    data = load_data("synthetic:cifar10", n=2048)
    x, y = data.train.tensors
    feats = torch.nn.functional.avg_pool2d(x, 8).flatten(1)  # coarse features carry the class signal
    w = torch.linalg.lstsq(torch.cat([feats, torch.ones(len(x), 1)], 1), torch.nn.functional.one_hot(y, 10).float()).solution
    acc = ((torch.cat([feats, torch.ones(len(x), 1)], 1) @ w).argmax(1) == y).float().mean()
    assert acc > 0.3  # chance is 0.1


def test_batch_order_depends_only_on_seed() -> None:
    data = load_data("synthetic:cifar10", n=64)
    first = [y for _, y in (next(it) for it in [batches(data, 16, seed=1)] * 5)]
    again = [y for _, y in (next(it) for it in [batches(data, 16, seed=1)] * 5)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    with pytest.raises(DataError, match="larger than the data set"):
        next(batches(data, 65, seed=1))


def _indexed(n: int) -> TensorDataset:
    """Samples that say which they are: x[i] = i."""
    return TensorDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n))


class _Plain(Dataset):
    """Not a TensorDataset: batches() goes through a DataLoader."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(i)]), i


@pytest.mark.parametrize("source", ["tensors", "dataset"])
def test_batch_order_follows_the_seed(source: str) -> None:
    """Each seed its own order, the same for that seed whatever the global RNG did before; every
    epoch is a permutation (the incomplete last batch dropped); ``start`` skips batches."""
    n, bs = 40, 8  # 5 full batches per epoch
    ds = _indexed(n) if source == "tensors" else _Plain(n)
    bundle = DataBundle(ds, (1,), n, "classification", "test")

    def take(seed: int, k: int, start: int = 0) -> list[list[int]]:
        it = batches(bundle, bs, seed=seed, start=start)
        return [next(it)[1].tolist() for _ in range(k)]

    torch.manual_seed(123)
    first = take(1, 10)
    torch.manual_seed(456)
    assert take(1, 10) == first  # the global RNG plays no part
    assert take(2, 10) != first and take(0, 10) != first  # the seed does
    assert take(2, 5) != take(3, 5)
    for epoch in (first[:5], first[5:]):
        assert sorted(i for b in epoch for i in b) == list(range(n))
    assert first[:5] != first[5:]  # a fresh shuffle each epoch
    assert take(1, 4, start=6) == first[6:10]  # a resumed run continues the sequence
    uneven = DataBundle(_indexed(43) if source == "tensors" else _Plain(43), (1,), 43, "classification", "test")
    it = batches(uneven, bs, seed=1)
    epoch = [next(it)[1].tolist() for _ in range(5)]
    assert all(len(b) == bs for b in epoch) and len({i for b in epoch for i in b}) == 40  # 3 dropped, none repeated


def test_npz_and_h5_arrays(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 3)
    data = load_data(f"npz:{tmp_path / 'd.npz'}")
    assert data.task == "classification" and data.num_outputs == 3 and data.input_shape == (5,)
    np.savez(tmp_path / "r.npz", inputs=x, targets=x[:, :2])
    data = load_data(f"npz:{tmp_path / 'r.npz'}", x_key="inputs", y_key="targets")
    assert data.task == "regression" and data.num_outputs == 2
    with pytest.raises(DataError, match=r"has no array 'x' \(found: inputs, targets\)"):
        load_data(f"npz:{tmp_path / 'r.npz'}")
    import h5py

    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"], f["y"] = x, np.arange(20) % 4
    assert load_data(f"h5:{tmp_path / 'd.h5'}").num_outputs == 4


def test_h5_data_reads_only_its_named_arrays(tmp_path: Path) -> None:
    """Another dataset of the file, however large, is not read (this one would be 364 TiB)."""
    import h5py

    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["inputs"], f["y"] = np.zeros((8, 3), dtype=np.float32), np.arange(8) % 2
        f.create_dataset("huge", shape=(10**7, 10**7), dtype="f4")
    assert len(load_data(f"h5:{tmp_path / 'd.h5'}", x_key="inputs")) == 8
    with pytest.raises(DataError, match=r"has no array 'x' \(found: huge, inputs, y\)"):
        load_data(f"h5:{tmp_path / 'd.h5'}")


def test_large_h5_arrays_are_mapped_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the layout allows (contiguous, uncompressed), a large array is read as used; others are read whole."""
    import h5py

    from bnprobe.store import reader

    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"], f["y"] = x, np.arange(16) % 2
        f.create_dataset("x_chunked", data=x, chunks=(4, 3), compression="gzip")
    monkeypatch.setattr(reader, "LAZY_BYTES", 0)
    arrays, _ = reader.read_arrays(tmp_path / "d.h5", ("x", "x_chunked"))
    assert isinstance(arrays["x"], np.memmap) and not isinstance(arrays["x_chunked"], np.memmap)
    for key in ("x", "x_chunked"):
        data = load_data(f"h5:{tmp_path / 'd.h5'}", x_key=key)
        assert isinstance(data.train, TensorDataset) and np.array_equal(data.train.tensors[0].numpy(), x)


@pytest.mark.parametrize(
    ("kind", "x", "y", "message"),
    [
        ("npz", np.where(np.arange(24).reshape(8, 3) == 7, np.nan, 0.0), np.arange(8) % 2, "array 'x' holds NaN at index [2, 1]"),
        ("h5", np.zeros((8, 3)), np.r_[np.zeros(5), -np.inf, 0, 0], "array 'y' holds -inf at index [5]"),
    ],
)
def test_non_finite_data_is_refused_at_load(tmp_path: Path, kind: str, x: np.ndarray, y: np.ndarray, message: str) -> None:

    path = tmp_path / f"d.{kind}"
    save_arrays(path, x, y)
    with pytest.raises(DataError, match=re.escape(message) + "; bnprobe trains on finite numbers only$"):
        load_data(f"{kind}:{path}")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("synthetic:imagenet", "unknown synthetic set"),
        ("torchvision:CIFAR10:/no/such/root", "does not exist"),
        ("torchvision:CIFAR11:/tmp", "did you mean 'CIFAR10'"),
        ("imagefolder:/no/such/dir", "does not exist"),
        ("npz:/no/such.npz", "does not exist"),
        ("csv:file.csv", "unknown data spec"),
    ],
)
def test_data_errors(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_data(spec)


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        ("synthtic:cifar10", {}, r"^unknown data spec 'synthtic:cifar10'; use .* or h5:FILE; did you mean 'synthetic'\?$"),
        ("npz", {}, r"^unknown data spec 'npz'; use .* or h5:FILE$"),  # a known kind without its argument: no hint
        ("synthetic:cifar10", {"nn": 8}, r"^data 'synthetic:cifar10' has no option 'nn'; did you mean 'n'\?$"),
        ("synthetic:linear", {"zzz": 1}, r"^data 'synthetic:linear' has no option 'zzz'; valid: n, dim, out_dim$"),
        ("torchvision:CIFAR11:/tmp", {}, r"^unknown torchvision data set 'CIFAR11'; did you mean 'CIFAR10'(, '\w+'){0,2}\?$"),
    ],
)
def test_spelling_hints(spec: str, options: dict[str, int], message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_data(spec, **options)


def test_segmentation_loss_is_per_pixel_cross_entropy_on_a_tensor_or_a_dict_out() -> None:
    loss_fn = load_data("synthetic:segmentation", n=4, test=0, size=8).loss_fn()
    logits, target = torch.randn(2, 11, 8, 8), torch.randint(11, (2, 8, 8))
    expected = torch.nn.functional.cross_entropy(logits, target)
    assert torch.equal(loss_fn(logits, target), expected)
    assert torch.equal(loss_fn({"out": logits, "aux": torch.zeros(2, 11, 8, 8)}, target), expected)
    with pytest.raises(DataError, match="per-pixel logits, as a tensor or under 'out' of a dict; got list"):
        loss_fn([logits], target)


def test_task_is_a_str_enum() -> None:
    """Built-in sets name their task by the member; a bundle given the plain word holds the member, which reads as the word."""
    assert load_data("synthetic:mnist", n=8).task is Task.CLASSIFICATION and load_data("synthetic:linear", n=8).task is Task.REGRESSION
    bundle = DataBundle(_indexed(4), (1,), 1, "regression", "test")
    assert bundle.task is Task.REGRESSION and bundle.task == "regression" and f"{bundle.task}|{bundle.task!s}" == "regression|regression"
    assert isinstance(bundle.loss_fn(), torch.nn.MSELoss)
    with pytest.raises(ValueError, match="'ranking' is not a valid Task"):
        DataBundle(_indexed(4), (1,), 1, "ranking", "test")


def test_torchvision_root_without_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found under"):
        load_data(f"torchvision:CIFAR10:{tmp_path}")


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), i * 40, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = load_data(f"imagefolder:{tmp_path}")
    assert data.num_outputs == 2 and data.input_shape == (3, 8, 8)
    x, _y = next(batches(data, 4, seed=0))
    assert x.shape == (4, 3, 8, 8)


def test_an_image_that_cannot_be_read_is_one_line_naming_it_when_training_reaches_it(tmp_path: Path) -> None:
    """ImageFolder lists files by their extension and reads them as training draws them: a file that
    is no image was PIL's error, its message a file object's repr (the run's line: test_hostile)."""
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / cls / "0.png")
    (tmp_path / "dog" / "1.png").write_text("not an image")
    data = load_data(f"imagefolder:{tmp_path}")
    with pytest.raises(DataError, match=r"^cannot read .*dog/1\.png: not an image file PIL can identify$"):
        data.train[len(data) - 1]


def test_imagefolder_counts_each_image_once_through_symbolic_links(tmp_path: Path) -> None:
    """A link to a folder above (a loop) is not followed round; the order of the samples is torchvision's."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    for folder in ("cat", "cat/young", "cat/young-ones", "dog"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.fromarray(np.full((4, 4, 3), i * 40, dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    plain = [(Path(p).relative_to(tmp_path), c) for p, c in ImageFolder(str(tmp_path)).samples]
    assert [(Path(p).relative_to(tmp_path), c) for p, c in load_data(f"imagefolder:{tmp_path}").train.samples] == plain
    (tmp_path / "dog" / "up").symlink_to(tmp_path)
    data = load_data(f"imagefolder:{tmp_path}")
    assert len(data) == 8 and data.num_outputs == 2


def test_h5_reader_is_the_store(tmp_path: Path) -> None:
    # a bnprobe file has no top-level x: the error lists what is there
    Store.create(tmp_path / "run.h5").close()
    with pytest.raises(DataError, match="has no array 'x'"):
        load_data(f"h5:{tmp_path / 'run.h5'}")
