"""One variant's training: build its model, train it for its steps, record into its run.

Each variant is built from the same seed (so layers shared between variants start from identical
weights), sees the same data order, and is recorded through :class:`bnprobe.Recorder`, the same
API users call in their own loops. Measurements that need extra passes (ICS, landscape, Hessian)
run at their schedule and leave no trace on the training trajectory. The experiment around the
variants (one config, one HDF5 file, torchrun's processes) is :mod:`bnprobe.experiment`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from . import distributed, health, rng
from .config import BnMode, Config, OptimizerName
from .data import DataBundle, Task, batches, load_data, pixel_logits
from .errors import BnprobeError, ConfigError, ModelError, StoreError, described, first_line
from .layers import probed_layers, relu_fed_layers
from .models import build_model, refuse_detection
from .passes import leave_no_trace, refuse_scripted
from .probes import Probe, StepBatch, load_probe_states, probe_states, scheduled_probes, track
from .probes import start as start_probes
from .recorder import Recorder
from .store import RunWriter, Status, signals_deferred
from .surgery import Action, BnPlan, apply_bn, is_batchnorm, synchronise_bn


@dataclass
class VariantResult:
    """How one variant ended, for the closing summary."""

    name: str
    status: Status
    steps: int
    final_loss: float
    final_accuracy: float
    seconds: float
    diverged_step: int | None = None
    averaged_steps: int = 10  # how many last steps final_loss and final_accuracy average
    error: str | None = None  # why a ``failed`` run stopped, in one line
    error_traceback: str = ""  # for --debug


@dataclass
class StepInfo:
    """What the progress display gets after every step."""

    variant: str
    step: int
    steps: int
    loss: float
    steps_per_second: float


ProgressFn = Callable[[StepInfo], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; an unavailable device is a config error."""
    if name == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    device = distributed.local_device(torch.device(name))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu or auto")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:  # mps without Metal, cuda:7 on a one-GPU machine...
        raise ConfigError(f"device {str(device)!r} is not available here; use --device cpu or auto") from e
    return device


def make_optimizer(cfg: Config, params: Any) -> torch.optim.Optimizer:
    if cfg.optimizer is OptimizerName.SGD:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.optimizer is OptimizerName.ADAM:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@contextmanager
def _naming_failures(model: nn.Module) -> Iterator[None]:
    """Turn a shape error in the first forward into a one-line error naming the failing layer."""
    refuse_scripted(model)
    entered: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _i, n=n: entered.append(n)) for n, m in model.named_modules() if n]
    try:
        yield
    except BnprobeError:
        raise
    except Exception as e:  # shape errors come as RuntimeError, AssertionError, ValueError...
        where = f" in layer {entered[-1]!r}" if entered else ""
        first = first_line(e)
        raise ModelError(f"the model cannot run on this data{where}: {first}") from e
    finally:
        for h in handles:
            h.remove()


def prepare_model(cfg: Config, bundle: DataBundle, device: torch.device | None = None) -> tuple[nn.Module, BnPlan | None]:
    """Build the model from ``cfg.seed``, check it runs on the data, apply the BN mode and move it
    to ``device``. The plan is None when there was nothing to plan (``keep`` without ``fold``).
    Under torchrun, every process calls this at once (the weights are rank 0's)."""
    model, x = _checked_model(cfg, bundle)
    plan = None
    if cfg.bn is not BnMode.KEEP or cfg.fold:
        model, plan = _surgery(cfg, model, x)
    _check_trainable(model, x)
    if cfg.sync_bn:
        _synchronised(model, device)
    model = model if device is None else model.to(device)
    # Under torchrun every process starts from rank 0's weights, as with DDP (a factory that draws
    # from an unseeded stream would otherwise train a different model in each process).
    distributed.broadcast_(t.detach() for t in model.state_dict().values())
    return model, plan


def _synchronised(model: nn.Module, device: torch.device | None) -> None:
    """BN layers as ``SyncBatchNorm``: under torchrun they normalise with the global batch's
    statistics (alone, they are plain BN). PyTorch's SyncBatchNorm runs on GPUs only."""
    if distributed.launched() and (device is None or device.type != "cuda"):
        raise ConfigError("sync_bn needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs only); use device: cuda or sync_bn: false")
    synchronise_bn(model)


def _checked_model(cfg: Config, bundle: DataBundle, trains: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """The model, built from the seed and checked on an example batch, and that batch's inputs. The
    loss is checked against its output only when it ``trains``: a surgery plan needs no logits."""
    model = _build_seeded(cfg, bundle)
    refuse_detection(model, cfg.model)
    x, y = bundle.example_batch(2)
    with _naming_failures(model):
        probed_layers(model, x)
        if trains:
            _check_output(model, bundle, x, y)
    return model, x


def _check_trainable(model: nn.Module, x: torch.Tensor) -> None:
    """The output must reach a trainable parameter, or the first ``backward`` fails (checked after
    the surgery: BN inserted into a frozen model trains)."""
    with leave_no_trace(model), torch.enable_grad():
        out = model(x)
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(out)):
        raise ModelError(
            "the model's output depends on no trainable parameter (all frozen, or its forward runs under torch.no_grad()); nothing would train"
        )


def _surgery(cfg: Config, model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, BnPlan]:
    c = cfg
    return apply_bn(model, c.bn.value, x, targets=c.bn_targets.value, keep_bias=c.keep_bias, fold=c.fold, noise=c.noise, seed=c.seed)


def _build_seeded(cfg: Config, bundle: DataBundle) -> nn.Module:
    """``cfg.model`` with weights drawn from ``cfg.seed`` alone (so variants share their initial
    weights), leaving the caller's global random stream where it was."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return build_model(cfg.model, bundle.num_outputs, bundle.input_shape, **dict(cfg.model_options))


def _check_output(model: nn.Module, bundle: DataBundle, x: torch.Tensor, y: torch.Tensor) -> None:
    """The loss must fit the model's output to the data's targets: a tuple, integer logits, or 3
    logits for 10 classes, would otherwise fail in the first training step (or, for labels the
    example batch lacks, much later). Checked by a forward that changes nothing."""
    with leave_no_trace(model), torch.no_grad():
        out = model(x)
    if bundle.task is Task.SEGMENTATION and isinstance(out, Mapping) and isinstance(out.get("out"), torch.Tensor):
        out = out["out"]  # torchvision's segmentation models
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"the model returns a {type(out).__name__}, not a tensor (bnprobe trains on one output)")
    if not out.is_floating_point():
        raise ModelError(f"the model's output is of dtype {str(out.dtype).removeprefix('torch.')}; the loss needs floating-point outputs")
    if bundle.task is Task.CLASSIFICATION:
        fits, wanted = out.ndim == 2 and out.shape[1] >= bundle.num_outputs, f"(batch, {bundle.num_outputs}) logits"
    elif bundle.task is Task.SEGMENTATION:
        fits = out.ndim == 4 and out.shape[1] >= bundle.num_outputs and out.shape[2:] == y.shape[1:]
        wanted = f"(batch, {bundle.num_outputs}, {', '.join(map(str, y.shape[1:]))}) per-pixel logits"
    else:
        fits, wanted = out.shape == y.shape, f"{tuple(y.shape)} like the targets"
    if not fits:
        raise ModelError(f"the model's output has shape {tuple(out.shape)} on a batch of {len(x)}; {bundle.spec} needs {wanted}")


def _accuracy(output: Any, y: torch.Tensor, task: Task) -> torch.Tensor | None:
    """The share of samples (for segmentation: of pixels) whose largest logit is their label."""
    if task is Task.REGRESSION:
        return None
    return (pixel_logits(output).argmax(dim=1) == y).float().mean()


def _plain_step(
    model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    optimizer.zero_grad(set_to_none=True)
    output = model(x)
    loss = loss_fn(output, y)
    loss.backward()
    distributed.average_gradients_(model.parameters())  # the global batch's gradient under torchrun
    optimizer.step()
    return loss.detach(), tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, output)  # a segmentation model's dict


def train_variant(
    cfg: Config,
    name: str,
    bundle: DataBundle,
    writer: RunWriter,
    progress: ProgressFn | None = None,
    prepared: tuple[nn.Module, BnPlan | None] | None = None,
    checkpoint: dict[str, Any] | None = None,
) -> VariantResult:
    """Train one variant for ``cfg.steps`` steps, recording into ``writer``.

    With ``checkpoint`` (from :func:`checkpoint_state`) the run continues where it stopped: same
    weights, optimizer state, random streams and data position, so the records equal those of an
    uninterrupted run.

    A non-finite loss ends the variant with status ``diverged``; Ctrl-C (KeyboardInterrupt)
    flushes, checkpoints, marks the run ``interrupted`` and propagates. An exception from the
    model or the data mid-run (or a MemoryError) ends it with status ``failed``, its records up to
    the last completed step kept and the error in ``VariantResult.error``; any other exception
    marks the run ``failed`` and propagates (a bug of bnprobe's, shown with its traceback).
    """
    device = resolve_device(cfg.device)
    model, plan = prepared if prepared is not None else prepare_model(cfg, bundle, device)
    run = _start(cfg, name, bundle, writer, model, plan, device, checkpoint)
    status, diverged_step, failed_step, error, error_traceback = Status.FINISHED, None, None, None, ""
    try:
        with run.rec:
            status, diverged_step = _train_steps(run, bundle, device, progress)
    except KeyboardInterrupt:
        with signals_deferred():  # a second Ctrl-C waits for the records, checkpoint and status to agree
            run.finish(Status.INTERRUPTED, save=True)
        raise
    except Exception as e:  # the run fails either way; the model's errors do not stop the others
        status, failed_step = Status.FAILED, run.steps_done
        stopped = distributed.peer_stopped(e)  # under torchrun: a collective found another process gone
        if stopped is not None:
            run.finish(status, save=False, failed_step=failed_step, error=str(stopped))
            raise stopped from e
        error = _failure(model, e, failed_step)
        if error is None:
            run.finish(status, save=False, failed_step=failed_step, error=described(e))
            raise
        error_traceback = "".join(traceback.format_exception(e))
        if distributed.world_size() > 1:  # the other processes wait in a collective: this one stopping stops them
            run.finish(status, save=False, failed_step=failed_step, error=error)
            raise ModelError(f"variant {name} failed: {error}") from e
    run.finish(status, save=status == Status.FINISHED, diverged_step=diverged_step, failed_step=failed_step, error=error)
    tail = slice(-10, None)
    return VariantResult(
        name,
        status,
        run.steps_done,
        float(np.mean(run.losses[tail])) if run.losses else math.nan,
        float(np.mean(run.accs[tail])) if run.accs else math.nan,
        run.rec.elapsed(),
        diverged_step,
        len(run.losses[tail]),
        error,
        error_traceback,
    )


@dataclass
class _Run:
    """One variant's training state: what the steps, the checkpoints and the closing status share."""

    cfg: Config
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    writer: RunWriter
    rec: Recorder
    probes: list[Probe]
    start: int
    losses: list[float] = dataclasses.field(default_factory=list)
    accs: list[float] = dataclasses.field(default_factory=list)

    @property
    def steps_done(self) -> int:
        return self.start + len(self.losses)

    def checkpoint(self, next_step: int) -> dict[str, Any]:
        return checkpoint_state(self.model, self.optimizer, next_step, self.rec, self.probes)

    def finish(self, status: Status, save: bool, **extra: Any) -> None:
        """Flush, checkpoint when ``save``, and set the run's status with ``extra`` attributes
        (``diverged_step``; ``failed_step`` and ``error``); None values are left out."""
        steps = self.steps_done
        self.rec.flush()
        if save:
            self.writer.save_checkpoint(self.checkpoint(steps), steps)
        extra = {k: v for k, v in extra.items() if v is not None}
        recorded = self.writer.read_back(health.INPUTS)
        recorded.attrs["status"] = str(status)  # a diverged run's flag reads it
        extra["health"] = health.flags_json(health.run_flags(recorded))
        self.writer.set_status(status, steps=steps, seconds=self.rec.elapsed(), write_seconds=self.writer.write_seconds, **extra)


def _start(
    cfg: Config,
    name: str,
    bundle: DataBundle,
    writer: RunWriter,
    model: nn.Module,
    plan: BnPlan | None,
    device: torch.device,
    checkpoint: dict[str, Any] | None,
) -> _Run:
    """Everything a variant's first step needs: optimizer, probes, recorder, and the state of a resumed run."""
    model.train()
    optimizer = make_optimizer(cfg, model.parameters())
    x0, _ = bundle.example_batch(2)
    # A variant where nothing matches (``--layers '*_bn'`` on ``keep``) records no moments or ICS;
    # the experiment has checked that some variant matches.
    layer_infos = probed_layers(model, x0.to(device), cfg.probes.layers, cfg.probes.kinds or None, require=False)
    writer.set_attrs(
        bn=cfg.bn.value, model=cfg.model, data=bundle.spec, seed=cfg.seed, device=str(device), optimizer=cfg.optimizer.value,
        lr=cfg.lr, batch_size=cfg.batch_size, planned_steps=cfg.steps, model_options=json.dumps(dict(cfg.model_options), sort_keys=True),
        data_options=json.dumps(dict(cfg.data_options), sort_keys=True), task=bundle.task, num_outputs=bundle.num_outputs,
        momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov, bn_targets=cfg.bn_targets.value,
        keep_bias=cfg.keep_bias, fold=cfg.fold, bn_layers=sum(1 for m in model.modules() if is_batchnorm(m)),
        bn_removed=sum(1 for c in plan.changes if c.action is Action.REMOVED) if plan is not None else 0,
        surgery=plan.summary() if plan is not None else "none",
        world_size=distributed.world_size(), dist_backend=distributed.backend() or "none", sync_bn=cfg.sync_bn,
    )  # fmt: skip
    names = [info.name for info, _ in layer_infos]
    writer.set_attrs(relu_fed=relu_fed_layers(model, x0.to(device), names) or "")
    probes = scheduled_probes(cfg, names)
    start_probes(probes, writer)
    start = _resume(name, model, optimizer, probes, writer, checkpoint) if checkpoint is not None else 0
    if checkpoint is None:  # dropout and other global draws start from the seed: a variant trains alike alone or after others
        torch.manual_seed(cfg.seed)
    p, m = cfg.probes, cfg.probes.moments
    rec = Recorder(
        model, writer, layers=p.layers, kinds=p.kinds or None, record_every=m.every, per_channel=m.per_channel,
        histogram_bins=m.histogram_bins, histogram_range=m.histogram_range, percentile_samples=m.percentile_samples,
        compiled_moments=m.compiled,
        seed=cfg.seed, flush_every=cfg.flush_every, flush_seconds=cfg.flush_seconds, start_step=start, require_match=False,
        generator_state=checkpoint.get("rng_recorder") if checkpoint else None,
        start_seconds=float(checkpoint.get("seconds", 0.0)) if checkpoint else 0.0, across_processes=True,
    )  # fmt: skip
    writer.set_attrs(status=Status.RUNNING)
    return _Run(cfg, name, model, optimizer, bundle.loss_fn(), writer, rec, probes, start)


def _resume(
    name: str, model: nn.Module, optimizer: torch.optim.Optimizer, probes: list[Probe], writer: RunWriter, checkpoint: dict[str, Any]
) -> int:
    """Load a checkpoint into the run; returns the step to continue from."""
    with _checkpoint_errors(name):
        start = int(checkpoint["next_step"])
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        rng.restore(model, rng.RngState(checkpoint["rng_cpu"], [], checkpoint["rng_modules"]))
        rng.restore_model_device_state(model, checkpoint.get("rng_cuda"))
        load_probe_states(probes, checkpoint.get("probes", {}))
    writer.truncate(start)
    return start


def check_checkpoint(cfg: Config, name: str, model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint that no longer fits its model (a model file edited since: other shapes)
    before a resume writes anything; loads it into ``model`` and an optimizer as the run will."""
    with _checkpoint_errors(name):
        int(checkpoint["next_step"])
        model.load_state_dict(checkpoint["model"])
        make_optimizer(cfg, model.parameters()).load_state_dict(checkpoint["optimizer"])


@contextmanager
def _checkpoint_errors(name: str) -> Iterator[None]:
    try:
        yield
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:  # a file edited or damaged
        raise StoreError(f"the checkpoint of run {name!r} does not fit its model and config: {described(e)}") from e


def _train_steps(run: _Run, bundle: DataBundle, device: torch.device, progress: ProgressFn | None) -> tuple[Status, int | None]:
    """The steps from ``run.start`` on; returns the status and, if the loss diverged, at which step."""
    cfg = run.cfg
    data = batches(bundle, cfg.batch_size, cfg.seed, start=run.start, shard=(distributed.rank(), distributed.world_size()))
    t0 = time.perf_counter()
    for step in range(run.start, cfg.steps):
        x, y = (t.to(device, non_blocking=True) for t in next(data))
        # Under torchrun every process holds rank 0's buffers (BN running statistics), as DDP does:
        # eval-mode measurements see one model, and a resumed run continues the uninterrupted one.
        distributed.broadcast_(run.model.buffers())
        distributed.seed_step(cfg.seed, step)
        batch = StepBatch(step, run.model, run.loss_fn, x, y, run.optimizer, heldout=bundle.test)
        for probe in run.probes:  # the one that performs the step (ICS) comes last
            track(probe, batch, run.writer)
        if batch.loss is None:
            batch.loss, batch.output = _plain_step(run.model, run.loss_fn, run.optimizer, x, y)
        batch.loss, acc = _global_mean(batch.loss, _accuracy(batch.output, y, bundle.task))
        run.rec.step(loss=batch.loss, accuracy=acc, lr=run.optimizer.param_groups[0]["lr"])
        loss_value = float(batch.loss)
        run.losses.append(loss_value)
        run.accs.append(float(acc) if acc is not None else math.nan)
        if not math.isfinite(loss_value):
            return Status.DIVERGED, step
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            run.rec.flush()
            run.writer.save_checkpoint(run.checkpoint(step + 1), step + 1)
        if progress is not None:
            progress(StepInfo(run.name, step + 1, cfg.steps, loss_value, (step + 1 - run.start) / (time.perf_counter() - t0)))
    return Status.FINISHED, None


def _global_mean(loss: torch.Tensor, acc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The global batch's loss and accuracy under torchrun: the means of the shards' (one size each)."""
    if distributed.world_size() == 1:
        return loss, acc
    both = torch.stack([loss.detach(), acc.to(loss.dtype) if acc is not None else torch.zeros_like(loss)])
    distributed.average_([both])
    return both[0], (both[1] if acc is not None else None)


def _failure(model: nn.Module, e: Exception, step: int) -> str | None:
    """One line for an exception raised at ``step`` by the model (naming the innermost of its
    modules in whose code it was raised) or while reading the data (an unreadable image); None
    when it came from neither, nor from lack of memory."""
    names = {id(m): n for n, m in model.named_modules()}
    found: tuple[str, nn.Module] | None = None
    tb = e.__traceback__
    while tb is not None:  # outermost frame first, so the last module found is the innermost
        if tb.tb_frame.f_code is batches.__code__:
            return f"reading the data for step {step} failed: {first_line(e) if isinstance(e, BnprobeError) else described(e)}"
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = (names[id(owner)], owner)
        tb = tb.tb_next
    if found is None and not isinstance(e, MemoryError):
        return None
    where = ""
    if found is not None:
        where = (
            f" in module {found[0]!r} ({type(found[1]).__name__})" if found[0] else f" in the model's own code ({type(found[1]).__name__})"
        )
    return f"the model raised at step {step}{where}: {described(e)}"


def checkpoint_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, next_step: int, rec: Recorder, probes: list[Probe]
) -> dict[str, Any]:
    """What resuming needs: weights, optimizer state, the next step, every random stream and probe state."""
    streams = rng.capture(model)
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "next_step": next_step,
        "rng_cpu": streams.cpu,
        "rng_cuda": rng.model_device_state(model),
        "rng_modules": streams.modules,
        "rng_recorder": rec.generator_state(),
        "probes": probe_states(probes),
        "seconds": rec.elapsed(),
    }


def inspect_model(cfg: Config) -> BnPlan:
    """The BN surgery plan for ``cfg``'s model on a small batch of its data, without training."""
    data, options = cfg.data, dict(cfg.data_options)
    if data == "synthetic:cifar10" and cfg.model == "dln":
        data = "synthetic:linear"  # the deep linear network takes vectors
    if data.startswith("synthetic:"):
        options["n"] = 8
    model, x = _checked_model(cfg, load_data(data, seed=cfg.seed, **options), trains=False)
    return _surgery(cfg, model, x)[1]
