"""torchrun runs: shards, exact reductions, rank 0 writing, failures that stop every
process. The end-to-end tests launch ``torchrun --standalone --nproc-per-node 2`` on CPU (gloo)
and compare its file with a one-process run of the same global batch."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from bnprobe import distributed
from bnprobe.config import load_config
from bnprobe.data import DataBundle, batches, load_data
from bnprobe.errors import ConfigError, SurgeryError
from bnprobe.probes.moments import Partial, finish, moment_stats, partial_moments
from bnprobe.store import STATS, Store
from bnprobe.surgery import NoisyNorm, NoisySyncBatchNorm, apply_bn, synchronise_bn
from bnprobe.trainer import prepare_model

# ----------------------------------------------------------------------------- merging moments


def _layers(seed: int) -> list[torch.Tensor]:
    """Three "layers" of [N, C, H, W] activations with different means, spreads and skews (and zeros)."""
    g = torch.Generator().manual_seed(seed)
    layers = [
        torch.randn(4, 3, 5, 5, generator=g) * 2 + seed,
        torch.rand(4, 3, 5, 5, generator=g) ** 3 - 0.5,
        torch.randn(4, 2, generator=g),
    ]
    layers[1][0, 0, :2] = 0.0
    return layers


def test_one_message_carries_every_layer_between_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """All layers' statistics (float64 bits inside the float32 message) and subsamples go in one
    gather, and come out merged by Chan's formulas: process 0 and a fake process 1 hold different
    shards (other means, so every cross term counts), and each layer's statistics are those of the
    two shards put together."""
    import bnprobe.probes.shards as shards

    def parts(seed: int) -> list[Partial]:
        return [partial_moments(t, per_channel, samples=10**6) for t in _layers(seed) for per_channel in (False, True)]

    monkeypatch.setattr(shards.distributed, "world_size", lambda: 2)
    sent: list[torch.Tensor] = []
    monkeypatch.setattr(shards.distributed, "gather", lambda message: sent.append(message) or [message, message])
    shards.merged_across_processes(parts(2))  # what process 1 sends
    monkeypatch.setattr(shards.distributed, "gather", lambda message: [message, sent[0]])
    merged = shards.merged_across_processes(parts(0))
    wanted = [
        moment_stats(torch.cat([a, b]), per_channel, samples=10**6) for a, b in zip(_layers(0), _layers(2)) for per_channel in (False, True)
    ]
    assert len(merged) == len(wanted) == 6
    for got, want in zip(merged, wanted):
        torch.testing.assert_close(finish(got), want, rtol=1e-4, atol=1e-5)  # float32 sums in another order
    assert float(finish(merged[2])[STATS.index("zero_fraction")]) > 0  # the zeros were counted


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _every_probe(rank: int, processes: int) -> dict[str, torch.Tensor]:
    """Each probe's numbers on this process's shard of one batch of 16 (under a process group: of the global batch)."""
    from bnprobe.probes.hessian import top_hessian_eigenvalue
    from bnprobe.probes.ics import gradient_shift
    from bnprobe.probes.landscape import landscape
    from bnprobe.probes.spectrum import hessian_trace, top_eigenvalues

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 6, generator=g), torch.randint(3, (16,), generator=g)
    x, y = x[rank::processes], y[rank::processes]
    model, loss_fn = _tiny_model(), torch.nn.CrossEntropyLoss()
    out: dict[str, torch.Tensor] = {}
    for method in ("naive", "fast"):
        trained = _tiny_model()
        result = gradient_shift(trained, loss_fn, x, y, torch.optim.SGD(trained.parameters(), lr=0.5, momentum=0.9), method=method)
        out[f"ics_{method}"] = torch.tensor([[v.l2, v.cosine, v.grad_norm] for v in result.values()])
        out[f"weights_{method}"] = torch.cat([p.detach().reshape(-1) for p in trained.parameters()])
    scan = landscape(model, loss_fn, x, y, etas=[0.1, 1.0])
    out["landscape"] = torch.tensor([*scan.loss, *scan.grad_l2, scan.loss_at_w, scan.grad_norm])
    out["hessian"] = torch.tensor(top_hessian_eigenvalue(model, loss_fn, x, y, tol=1e-8, max_iter=60).eigenvalue)
    out["top_k"] = top_eigenvalues(model, loss_fn, x, y, k=2, tol=1e-8).values
    out["trace"] = torch.tensor(hessian_trace(model, loss_fn, x, y, samples=3).trace)
    return out


def _probe_process(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        draws = []
        for step in (5, 5, 6):
            distributed.seed_step(0, step)
            draws.append(torch.rand(4))
        torch.save({"probes": _every_probe(rank, 2), "draws": torch.stack(draws)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_probe_of_two_processes_is_the_global_batchs(tmp_path: Path) -> None:
    """ICS (naive and fast, with the real optimizer step), landscape, Hessian, top-k and trace of
    two processes each holding half of a batch equal those of one process holding all of it, in
    both processes (so both took the same steps and made the same stopping decisions). And each
    process's dropout stream is its own, derived from the step."""
    torch.multiprocessing.spawn(_probe_process, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    alone = _every_probe(0, 1)
    saved = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    for rank in range(2):
        shared = saved[rank]["probes"]
        assert shared.keys() == alone.keys()
        for name, values in alone.items():
            torch.testing.assert_close(shared[name].double(), values.double(), rtol=1e-5, atol=1e-6, msg=name)
    # dropout streams: the same draws for the same step, other draws for another step or process
    zero, one = (saved[rank]["draws"] for rank in range(2))
    assert torch.equal(zero[0], zero[1]) and not torch.equal(zero[0], zero[2]) and not torch.equal(zero[0], one[0])


UNSEEDED = """
import os
import torch


def factory(num_classes, input_shape):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))
    with torch.no_grad():  # weights from a stream of the process's own: each process builds another model
        model[1].weight.copy_(torch.randn(model[1].weight.shape, generator=torch.Generator().manual_seed(int(os.environ["RANK"]))))
    return model
"""


def _prepare_process(rank: int, init: str, where: str) -> None:
    import torch.distributed as dist

    os.environ["RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        cfg = load_config(None, {"model": f"{where}/unseeded.py:factory", "data": "synthetic:linear", "data_options": {"n": 16}})
        model, _ = prepare_model(cfg, load_data(cfg.data, seed=0, n=16), torch.device("cpu"))
        torch.save(model.state_dict(), f"{where}/weights.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_process_starts_from_rank_0s_weights(tmp_path: Path) -> None:
    (tmp_path / "unseeded.py").write_text(UNSEEDED)
    torch.multiprocessing.spawn(_prepare_process, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    zero, one = (torch.load(tmp_path / f"weights.{r}") for r in range(2))
    assert zero.keys() == one.keys() and all(torch.equal(zero[k], one[k]) for k in zero)


class _HalfUsed(torch.nn.Module):
    """Called in every process, but its ``scale`` is used by process 0's shard only."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.scale = torch.nn.Linear(3, 3), torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h * self.scale if os.environ["RANK"] == "0" else h


class _Branchy(torch.nn.Module):
    """Process 1's shard skips a layer: the case of a model whose branches depend on its data."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.branch, self.unused = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        return self.branch(h) if os.environ["RANK"] == "0" else h


def _skipping_process(rank: int, init: str, where: str) -> None:
    import torch.distributed as dist

    from bnprobe import Recorder
    from bnprobe.errors import ModelError
    from bnprobe.probes.ics import gradient_shift

    os.environ["RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = _Branchy()
        model(torch.ones(2, 3)).sum().backward()
        distributed.average_gradients_(model.parameters())
        torch.save({n: p.grad for n, p in model.named_parameters()}, f"{where}/grads.{rank}")
        distributed.check_same_everywhere(("layers", 1), "the layers")  # alike: nothing raised
        # every layer; then only the one process 1 skips (process 1 records nothing at all)
        for error_file, layers in (("error", "*"), ("branch_error", "branch")):
            try:
                with Recorder(model, f"{where}/{error_file}{rank}.h5", layers=layers, record_every=1, across_processes=True) as rec:
                    for _ in range(2):
                        model(torch.ones(2, 3))
                        rec.step()
            except ModelError as e:
                Path(f"{where}/{error_file}.{rank}").write_text(str(e))
        try:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            gradient_shift(model, lambda out, _: out.square().mean(), torch.ones(2, 3), None, opt)
        except ModelError as e:
            Path(f"{where}/ics_error.{rank}").write_text(str(e))
        half = _HalfUsed()  # the same layers everywhere, a parameter without gradient in process 1
        for method in ("naive", "fast"):
            opt = torch.optim.SGD(half.parameters(), lr=0.1)
            ics = gradient_shift(half, lambda out, _: out.square().mean(), torch.ones(2, 3), None, opt, method=method)
            torch.save({n: tuple(v) for n, v in ics.items()}, f"{where}/ics_{method}.{rank}")
    finally:
        dist.destroy_process_group()


def test_a_layer_one_process_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients: a parameter process 1 left without one counts as zero there (as in one process on
    the whole batch); one no process used stays None. Moments and ICS: the processes' layers
    differ (also where a process recorded nothing), so every process stops with the same error
    instead of exchanging tensors of different sizes (which gloo turns into wrong numbers in one
    process and an abort in the other). ICS of a layer whose parameter one process's shard leaves
    without a gradient: the same in both."""
    torch.multiprocessing.spawn(_skipping_process, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    zero, one = (torch.load(tmp_path / f"grads.{r}") for r in range(2))
    torch.manual_seed(0)
    alone = _Branchy()
    monkeypatch.setenv("RANK", "0")
    first_grads = torch.autograd.grad(alone(torch.ones(2, 3)).sum(), [alone.first.weight, alone.branch.weight])
    for grads in (zero, one):
        assert grads["unused.weight"] is None and grads["unused.bias"] is None
        torch.testing.assert_close(grads["branch.weight"], first_grads[1] / 2)  # process 1's share: zero
        assert grads["first.weight"].shape == (3, 3)
    assert all(torch.equal(zero[k], one[k]) for k in zero if zero[k] is not None)
    errors = [(tmp_path / f"error.{r}").read_text() for r in range(2)]
    assert errors[0] == errors[1] and errors[0].startswith(
        "the layers recorded at step 0 or their shapes differ between process 0 and process 1: under torchrun"
    )
    ics_errors = [(tmp_path / f"ics_error.{r}").read_text() for r in range(2)]
    assert ics_errors[0] == ics_errors[1] and ics_errors[0].startswith(
        "the layers an ICS step called differ between process 0 and process 1"
    )
    branch_errors = [(tmp_path / f"branch_error.{r}").read_text() for r in range(2)]
    assert branch_errors[0] == branch_errors[1] and branch_errors[0].startswith("the layers recorded at step 0")
    for method in ("naive", "fast"):  # ICS of a layer whose parameter one shard leaves alone: the processes agree
        values = [torch.load(tmp_path / f"ics_{method}.{r}") for r in range(2)]
        assert values[0].keys() == {"lin", ""} and values[0] == values[1]


# ----------------------------------------------------------------------------- sharded batches


class _Numbers(Dataset[tuple[torch.Tensor, int]]):
    """Not a TensorDataset: batches() goes through a DataLoader."""

    def __len__(self) -> int:
        return 37

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(i)]), i


def _bundles() -> list[DataBundle]:
    tensors = load_data("synthetic:linear", seed=0, n=40)
    return [tensors, DataBundle(_Numbers(), (1,), 37, "classification", "numbers")]


@pytest.mark.parametrize("bundle", _bundles(), ids=["tensors", "loader"])
def test_each_process_gets_its_deal_of_the_one_process_batch(bundle: DataBundle) -> None:
    """Rank r's batch is every 2nd sample of the one-process batch from r on (DistributedSampler's
    deal), also after skipping batches for a resume."""
    for start in (0, 5):
        one = batches(bundle, 8, seed=3, start=start)
        ranks = [batches(bundle, 8, seed=3, start=start, shard=(r, 2)) for r in range(2)]
        for _ in range(9):  # past an epoch
            x, y = next(one)
            for r, it in enumerate(ranks):
                xr, yr = next(it)
                assert torch.equal(yr, y[r::2]) and torch.equal(xr, x[r::2])


# ----------------------------------------------------------------------------- one process


def test_scratch_store_keeps_nothing(in_tmp: Path) -> None:
    """What the processes other than rank 0 write to: no file, and no records kept in memory."""
    store = Store.scratch()
    writer = store.run("r", {})
    for step in range(3):
        writer.append("train", step, {"loss": 1.0, "accuracy": 0.5, "lr": 0.1, "seconds": 0.0})
    writer.set_dataset_attrs("train/loss", unit="nats")
    writer.save_checkpoint({"a": torch.ones(2)}, 1)
    writer.flush()
    assert not writer.has_pending_steps() and not store.has_records() and store.checkpoint("r") is None
    store.close()
    assert list(in_tmp.iterdir()) == []


def test_sync_bn_converts_and_refuses_cpu_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("model: mlp\ndata: synthetic:linear\ndata_options: {n: 32}\nbn: insert\nsync_bn: true\n")
    cfg = load_config(cfg_path)
    bundle = load_data(cfg.data, seed=0, n=32)
    model, _ = prepare_model(cfg, bundle, torch.device("cpu"))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert not any(type(m) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d) for m in model.modules())
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="sync_bn needs CUDA"):
        prepare_model(cfg, bundle, torch.device("cpu"))


def test_sync_bn_keeps_noisy_bn_noisy_and_refuses_a_bn_with_its_own_forward() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    noisy, _ = apply_bn(model, "noisy", x, seed=3)
    before = [(m.noise_seed, m.generator.get_state()) for m in noisy.modules() if isinstance(m, NoisyNorm)]
    assert synchronise_bn(noisy) == ["1"]
    assert type(noisy[1]) is NoisySyncBatchNorm
    after = [(m.noise_seed, m.generator.get_state()) for m in noisy.modules() if isinstance(m, NoisyNorm)]
    assert len(after) == len(before) == 1 and after[0][0] == before[0][0] and torch.equal(after[0][1], before[0][1])
    noisy.train()
    assert not torch.equal(noisy(x), noisy(x))  # runs (alone, as plain BN), and the noise is still drawn

    class BnAct(torch.nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(super().forward(x))

    with pytest.raises(SurgeryError, match="BnAct"):
        synchronise_bn(torch.nn.Sequential(BnAct(4)))


def _raised(message: str, filename: str) -> RuntimeError:
    """A RuntimeError raised in code that claims to live in ``filename`` (its traceback's frame)."""
    try:
        exec(compile(f"raise RuntimeError({message!r})", filename, "exec"))
    except RuntimeError as e:
        return e
    raise AssertionError("not raised")


def test_only_backend_failures_inside_torch_distributed_mean_a_peer_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gloo collective (bnprobe's, or SyncBatchNorm's inside the model) that finds a peer gone says
    so in a RuntimeError from torch.distributed; a model's own error that mentions a timeout is its
    own, and so is anything in a single process."""
    inside = os.path.join(os.path.dirname(torch.distributed.__file__), "distributed_c10d.py")
    gone = _raised("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234", inside)
    assert distributed.peer_stopped(gone) is None  # one process: there is no peer
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    stopped = distributed.peer_stopped(gone)
    assert stopped is not None and "another process of the run stopped (Connection closed by peer)" in str(stopped)
    assert distributed.peer_stopped(_raised("the camera connection timed out", "camera.py")) is None
    assert distributed.peer_stopped(_raised("size mismatch", inside)) is None  # from torch.distributed, but not a stopped peer


def test_dist_timeout_must_be_positive(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("dist_timeout: 0\n")
    with pytest.raises(ConfigError, match="dist_timeout"):
        load_config(tmp_path / "c.yaml")


def test_checkpoints_carry_the_model_gpus_stream(tmp_path: Path) -> None:
    """The checkpoint holds the stream of the GPU the model is on (None on CPU); restoring it is
    a no-op for a model on CPU (a GPU run continued on CPU), and sets that GPU's stream on CUDA."""
    from bnprobe import rng
    from bnprobe.store import load_checkpoint

    (tmp_path / "c.yaml").write_text("model: mlp\ndata: synthetic:linear\ndata_options: {n: 32}\nsteps: 2\nbatch_size: 8\ndevice: cpu\n")
    done = _bnprobe(["train", "c.yaml", "--set", "output=c.h5"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint, _ = load_checkpoint(tmp_path / "c.h5", "keep")
    assert "rng_cuda" in checkpoint and checkpoint["rng_cuda"] is None
    rng.restore_model_device_state(torch.nn.Linear(2, 2), torch.zeros(16, dtype=torch.uint8))  # on CPU: nothing to set
    if torch.cuda.is_available():
        model = torch.nn.Linear(2, 2).cuda()
        state = rng.model_device_state(model)
        torch.rand(3, device="cuda")
        rng.restore_model_device_state(model, state)
        assert state is not None and torch.equal(torch.cuda.get_rng_state(), state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recorded_steps_never_synchronise_on_cuda(tmp_path: Path) -> None:
    """Moments (per channel and histograms too) stay on the device until a flush."""
    from bnprobe import Recorder
    from bnprobe.models import vgg

    model = vgg(10, (3, 32, 32), width=0.25).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 3, 32, 32, device="cuda"), torch.randint(10, (16,), device="cuda")
    with Recorder(
        model, tmp_path / "r.h5", record_every=1, per_channel=True, histogram_bins=8, flush_every=10**6, flush_seconds=1e9
    ) as rec:
        for step in range(3):
            if step == 1:  # the first step fixes the layer order; the next ones are the steady state
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                rec.step(loss=loss)
            finally:
                torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- torchrun, 2 processes

MODEL = '''
import os
import torch
from torch import nn


from bnprobe.passes import measuring


class Mlp(nn.Module):
    """A BN-free MLP (with dropout if BNPROBE_TEST_DROPOUT is set) whose forward raises in process 1
    in training step BNPROBE_TEST_FAIL_AT (when set)."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        dropout = [nn.Dropout(0.3)] if os.environ.get("BNPROBE_TEST_DROPOUT") else []
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), 12), nn.ReLU(), *dropout,
                                 nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, num_classes))
        self.calls = 0

    def forward(self, x):
        if measuring():  # bnprobe's extra passes (layer discovery, ICS, landscape, Hessian)
            return self.net(x)
        self.calls += 1
        if os.environ.get("RANK") == "1" and str(self.calls - 1) == os.environ.get("BNPROBE_TEST_FAIL_AT"):
            raise ValueError("bad sample in this shard")
        return self.net(x)


def factory(num_classes, input_shape):
    return Mlp(num_classes, input_shape)
'''

CONFIG = """name: d
model: mlp.py:factory
data: synthetic:cifar10
data_options: {n: 256}
steps: 8
batch_size: 16
lr: 0.1
device: cpu
checkpoint_every: 3
dist_timeout: 60
probes:
  moments: {every: 1, per_channel: true, histogram_bins: 8, percentile_samples: 100000}
  ics: {every: 3}
  landscape: {enabled: true}
  hessian: {enabled: true, blocks: true}
  spectrum: {enabled: true, every: 4, trace_samples: 3}
"""


def _bnprobe(args: list[str], cwd: Path, processes: int = 1, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*launcher, "-m", "bnprobe", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same config trained by one process and by two (each on half of every batch)."""
    where = tmp_path_factory.mktemp("dist")
    (where / "mlp.py").write_text(MODEL)
    (where / "d.yaml").write_text(CONFIG)
    for processes, out in ((1, "one.h5"), (2, "two.h5")):
        done = _bnprobe(["train", "d.yaml", "--set", f"output={out}"], where, processes)
        assert done.returncode == 0, done.stderr[-3000:]
    return where


def _datasets(path: Path, run: str = "keep") -> dict[str, np.ndarray]:
    """The run's float datasets but timings, by path."""
    found: dict[str, np.ndarray] = {}

    def keep(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f" and "seconds" not in name:
            found[name] = obj[()]

    with h5py.File(path) as f:
        f[f"runs/{run}"].visititems(keep)
    return found


@pytest.mark.slow
def test_two_processes_equal_one_on_the_global_batch(runs: Path) -> None:
    """Without BN the two-process run is the one-process run: moments (per channel, histograms,
    percentiles of all samples), ICS, landscape, Hessian and spectrum, to float tolerance, and the
    layers table (output shapes of the global batch)."""
    one, two = _datasets(runs / "one.h5"), _datasets(runs / "two.h5")
    assert one.keys() == two.keys()
    sections = {name.split("/")[0] for name in one}
    assert {"train", "moments", "ics", "landscape", "hessian", "spectrum"} <= sections
    for name, values in one.items():
        np.testing.assert_allclose(two[name], values, rtol=2e-4, atol=2e-5, err_msg=name)
    with h5py.File(runs / "two.h5") as f:
        attrs = f["runs/keep"].attrs
        assert (attrs["world_size"], attrs["dist_backend"]) == (2, "gloo")
        two_layers = f["runs/keep/layers"][()]
    with h5py.File(runs / "one.h5") as f:
        assert (f["runs/keep"].attrs["world_size"], f["runs/keep"].attrs["dist_backend"]) == (1, "none")
        assert f["runs/keep/layers"][()].tolist() == two_layers.tolist()  # output shapes of the global batch


@pytest.mark.slow
def test_one_failing_process_stops_the_others_and_the_run_resumes(runs: Path) -> None:
    """Process 1 raises in step 4: both stop (no hang), each says one line (process 0 that the
    other stopped, process 1 why), the file keeps steps 0-3 and the step-3 checkpoint, and a
    resumed run ends where the uninterrupted one did. With BN and an eval-mode Hessian, which reads
    the running statistics (every process holds rank 0's, so the resumed run's are the same), and
    with dropout (each process's masks come from the step)."""
    bn = ["--set", "bn=insert", "--set", "probes.hessian.bn_mode=eval"]
    dropout = {"BNPROBE_TEST_DROPOUT": "1"}
    full_run = _bnprobe(["train", "d.yaml", "--set", "output=bn.h5", *bn], runs, 2, dropout)
    assert full_run.returncode == 0, full_run.stderr[-3000:]
    done = _bnprobe(["train", "d.yaml", "--set", "output=failed.h5", *bn], runs, 2, {"BNPROBE_TEST_FAIL_AT": "4", **dropout})
    assert done.returncode != 0
    ours = ["bnprobe:" + line for line in done.stderr.split("bnprobe:")[1:]]  # rank 1's may follow rank 0's bar on its line
    assert len(ours) == 2, done.stderr[-3000:]
    assert any("another process of the run stopped" in line for line in ours)
    assert any("error (process 1): variant insert failed" in line and "bad sample in this shard" in line for line in ours)
    assert "[rank0]" not in done.stderr and "[rank1]" not in done.stderr  # no traceback of ours
    with h5py.File(runs / "failed.h5") as f:
        run = f["runs/insert"]
        assert run.attrs["status"] == "failed" and run["checkpoint"].attrs["step"] == 3
    resumed = _bnprobe(["train", "--resume", "failed.h5"], runs, 2, dropout)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full, again = _datasets(runs / "bn.h5", "insert"), _datasets(runs / "failed.h5", "insert")
    assert full.keys() == again.keys()
    for name, values in full.items():
        np.testing.assert_array_equal(again[name], values, err_msg=name)


USER_LOOP = """
import contextlib, os, sys
import torch, torch.distributed as dist
from torch import nn
import bnprobe

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
g = torch.Generator().manual_seed(1)
x, y = torch.randn(64, 8, generator=g), torch.randint(3, (64,), generator=g)
net, xs, ys = model, x, y
if "WORLD_SIZE" in os.environ:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    net, xs, ys = nn.parallel.DistributedDataParallel(model), x[rank::size], y[rank::size]
opt = torch.optim.SGD(net.parameters(), lr=0.1)
merged = sys.argv[2] == "merged"  # else: a Recorder of rank 0's shard, in rank 0 alone
recording = merged or not dist.is_initialized() or dist.get_rank() == 0
recorder = bnprobe.Recorder(model, sys.argv[1], record_every=1, percentile_samples=10**6, across_processes=merged) if recording else None
with recorder if recorder is not None else contextlib.nullcontext():
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(xs), ys)
        loss.backward()
        opt.step()
        if recorder is not None:
            recorder.step(loss=loss)
if "WORLD_SIZE" in os.environ:
    dist.barrier()  # rank 0 may still be writing its file
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_recorder_in_a_users_ddp_loop(tmp_path: Path) -> None:
    """The Recorder (``across_processes``) around a user's own DistributedDataParallel loop: rank 0
    alone writes the file, and its moments are the global batch's (those of the loop in one process)."""
    (tmp_path / "loop.py").write_text(USER_LOOP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    for launcher, out, how in (([sys.executable], "one.h5", "merged"), (torchrun, "two.h5", "merged"), (torchrun, "rank0.h5", "local")):
        done = subprocess.run([*launcher, "loop.py", out, how], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
    # without across_processes, a Recorder in rank 0 alone runs no collective (that would hang) and writes its file
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["one.h5", "rank0.h5", "two.h5"]
    with h5py.File(tmp_path / "one.h5") as one, h5py.File(tmp_path / "two.h5") as two:
        for stat in STATS:
            np.testing.assert_allclose(two[f"runs/run/moments/{stat}"][()], one[f"runs/run/moments/{stat}"][()], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_plain_bn_normalises_each_process_shard(tmp_path: Path) -> None:
    """With plain BN each process normalises its own shard: the first step's loss is the mean of
    the shards' losses with their own batch statistics, not the global batch's loss."""
    config = "model: mlp\nbn: insert\ndata: synthetic:cifar10\ndata_options: {n: 64}\nsteps: 1\nbatch_size: 16\ndevice: cpu\n"
    (tmp_path / "bn.yaml").write_text(config)
    done = _bnprobe(["train", "bn.yaml", "--set", "output=bn.h5"], tmp_path, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    with h5py.File(tmp_path / "bn.h5") as f:
        recorded = float(f["runs/insert/train/loss"][0])
    cfg = load_config(tmp_path / "bn.yaml")
    bundle = load_data(cfg.data, seed=cfg.seed, **dict(cfg.data_options))
    model, _ = prepare_model(cfg, bundle, torch.device("cpu"))
    x, y = next(batches(bundle, cfg.batch_size, cfg.seed))
    loss_fn = bundle.loss_fn()
    with torch.no_grad():
        shards = [float(loss_fn(model(x[r::2]), y[r::2])) for r in range(2)]
        whole = float(loss_fn(model(x), y))
    assert recorded == pytest.approx(sum(shards) / 2, rel=1e-5)
    assert abs(recorded - whole) > 1e-3


def test_a_run_resumes_with_the_processes_it_was_trained_by(in_tmp: Path, tiny_config: Path) -> None:
    """Each process's BN statistics and dropout draws depend on the number of processes: resuming a
    2-process run in one process is refused with the command that continues it."""
    from typer.testing import CliRunner

    from bnprobe.cli import app

    runner = CliRunner()
    trained = runner.invoke(app, ["train", str(tiny_config), "--bn", "keep", "--bn", "insert", "--set", "checkpoint_every=2", "-o", "r.h5"])
    assert trained.exit_code == 0
    with h5py.File("r.h5", "a") as f:
        for name in ("keep", "insert"):
            f[f"runs/{name}"].attrs["status"] = "interrupted"
        f["runs/insert"].attrs["world_size"] = 2
    refused = runner.invoke(app, ["train", "--resume", "r.h5"])
    assert refused.exit_code == 2 and refused.stderr.strip() == (
        "bnprobe: error: variant insert of r.h5 was trained by 2 process(es), not 1: "
        "resume it with torchrun --nproc-per-node 2 -m bnprobe train --resume r.h5"
    )
    with h5py.File("r.h5") as f:  # refused before any variant trained: keep was not continued either
        assert f["runs/keep"].attrs["status"] == "interrupted"
    with h5py.File("r.h5", "a") as f:
        f["runs/insert"].attrs["world_size"] = 1
    assert runner.invoke(app, ["train", "--resume", "r.h5"]).exit_code == 0


class _Shapes(torch.nn.Module):
    """Outputs batch first, sequence first, and without a batch dimension (a positional table)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.seq_first, self.table = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Embedding(5, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq_first(self.proj(x).transpose(0, 1)) + self.table(torch.arange(x.shape[1]))[:, None]


def test_the_layers_table_gives_the_global_batchs_shapes(tmp_path: Path) -> None:
    """Each of 2 processes sees a shard of 4 samples: the table gives the shapes of the batch of 8,
    the shard's batch dimension wherever a layer puts it."""
    from bnprobe import Recorder

    rec = Recorder(_Shapes(), tmp_path / "r.h5", record_every=1)
    rec.processes = 2  # what across_processes=True gives under torchrun with 2 processes
    with rec:
        rec.model(torch.randn(4, 5, 8))
        rec._fix_order()
        shapes = {layer.name: layer.output_shape for layer in rec.layers}
    assert shapes == {"proj": (8, 5, 8), "seq_first": (5, 8, 8), "table": (5, 8)}


def test_sparse_gradients_are_refused_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnprobe.errors import ModelError

    table = torch.nn.Embedding(4, 2, sparse=True)
    table(torch.tensor([1, 2])).sum().backward()
    distributed.average_gradients_(table.parameters())  # one process: nothing to average
    assert table.weight.grad is not None and table.weight.grad.is_sparse
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ModelError, match=r"^sparse gradients \(nn.Embedding\(sparse=True\)\) cannot be averaged"):
        distributed.average_gradients_(table.parameters())
