"""``Recorder``: the probes as a context manager around any training loop.

    with bnprobe.Recorder(model, "run.h5", layers="features.*", record_every=10) as rec:
        for x, y in loader:
            loss = step(x, y)
            rec.step(loss=loss)

Moments flow in through forward hooks while the model is in train mode; ``rec.step()`` closes the
step. Layer order is forward order (:func:`bnprobe.layers.first_calls`) in the first recorded
forward pass.
Device tensors are kept until a flush, so the probes never synchronise per layer per step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed
from .config import layer_patterns
from .layers import FirstCall, LayerInfo, first_calls, layer_kind, own_parameters, parameter_holders, select
from .passes import measuring, refuse_scripted
from .probes.moments import (
    DEFAULT_SAMPLES,
    Deferred,
    Partial,
    Summed,
    Workspace,
    deferred_or_partial,
    finish_all,
    histogram,
    partial_moments,
    partials_together,
)
from .probes.shards import merged_across_processes
from .store import STATS, RunWriter, Status, Store


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _candidates(model: nn.Module, layers: str | Sequence[str], kinds: Sequence[str] | None, require: bool) -> list[tuple[str, nn.Module]]:
    """The layers to hook: those with parameters of their own that ``layers`` / ``kinds`` select.

    Their order is fixed later, by the first recorded training forward itself (the Recorder runs
    no forward of its own, unlike :func:`bnprobe.layers.execution_order`)."""
    patterns = layer_patterns(layers)
    owners = parameter_holders(model)
    picked = select([(n, layer_kind(m)) for n, m in owners], patterns, kinds)
    if not picked and require:
        from .errors import ConfigError

        raise ConfigError(f"no layer with parameters matches layers={list(patterns)!r}" + (f", kinds={list(kinds)!r}" if kinds else ""))
    return [owners[i] for i in picked]


class Recorder:
    """Attach moment probes to ``model`` and write one run's records to an HDF5 file.

    ``output`` is a path (a new file with one run named ``run``) or a :class:`RunWriter` of an
    open :class:`Store` (how the trainer puts several variants in one file). A module called
    several times per forward is recorded at its first call of the step. ``across_processes``, in
    a process group (torchrun, DDP) where every process calls :meth:`step` at the same steps and
    runs the same layers: the moments are those of the global batch (merged across the processes)
    and only rank 0 writes ``output``; loss and accuracy are recorded as given (pass the global
    ones). ``compiled_moments``
    computes each large layer's statistics with one ``torch.compile``d kernel (compiles once; see
    :class:`bnprobe.probes.moments.Workspace`).
    """

    def __init__(
        self,
        model: nn.Module,
        output: str | Path | RunWriter,
        layers: str | Sequence[str] = "*",
        kinds: Sequence[str] | None = None,
        record_every: int = 10,
        per_channel: bool = False,
        histogram_bins: int = 0,
        histogram_range: tuple[float, float] = (-10.0, 10.0),
        percentile_samples: int = DEFAULT_SAMPLES,
        compiled_moments: bool = False,
        seed: int = 0,
        run: str = "run",
        force: bool = False,
        start_step: int = 0,
        flush_every: int = 500,
        flush_seconds: float = 5.0,
        generator_state: torch.Tensor | None = None,
        start_seconds: float = 0.0,
        require_match: bool = True,
        across_processes: bool = False,
    ) -> None:
        refuse_scripted(model)  # before any file is made
        self.model = model
        self._candidates = _candidates(model, layers, kinds, require_match)
        self.processes = distributed.world_size() if across_processes else 1
        self._owned_store, self.writer = self._open(output, force, run)
        self.record_every = record_every
        self.per_channel = per_channel
        self.histogram_bins = histogram_bins
        self.histogram_range = histogram_range
        self.samples = percentile_samples
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._last_flush = time.perf_counter()
        self.step_index = start_step
        self._generator: torch.Generator | None = None
        self._generator_state = generator_state  # a resumed run continues the subsample stream
        self._seed = seed
        self._workspace = Workspace(compiled_moments)  # the statistics' temporaries, reused across layers and steps
        self._order: list[tuple[str, nn.Module]] = []  # forward-execution order, fixed after the first record step
        self._current: dict[str, Partial | Deferred | Summed] = {}  # this step's statistics (or what they come from), by layer name
        self._current_channel: dict[str, Partial] = {}
        self._current_hist: dict[str, torch.Tensor] = {}
        self._pending: list[tuple[int, torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]] = []
        self._train_rows: list[tuple[int, Any, Any, Any, float]] = []
        self._handles: list[Any] = []
        self._flow = ExitStack()  # first_calls around the first recorded forward of the model
        self._flow_order: list[FirstCall] = []
        self._t0 = time.perf_counter() - start_seconds  # a resumed run's clock goes on from its checkpoint
        self.layers: list[LayerInfo] = []

    def _open(self, output: str | Path | RunWriter, force: bool, run: str) -> tuple[Store | None, RunWriter]:
        """The store this recorder owns (None when given a writer of someone else's) and the run's writer."""
        if isinstance(output, RunWriter):
            return None, output
        main = self.processes == 1 or distributed.is_main()  # under torch.distributed only rank 0 writes the file
        store = Store.create(output, force=force) if main else Store.scratch()  # the others write to memory
        return store, store.run(run, {"model": type(self.model).__name__})

    def elapsed(self) -> float:
        """Seconds of this run so far, including those before a resume."""
        return time.perf_counter() - self._t0

    def generator_state(self) -> torch.Tensor | None:
        """State of the percentile-subsample generator (checkpoints restore it for exact resumes)."""
        return self._generator.get_state() if self._generator is not None else None

    # -------------------------------------------------------------- hooks

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, _inp: Any, out: Any) -> None:
            if measuring() or not module.training or name in self._current:
                return
            if not self._order_fixed:
                self._seen_shapes.setdefault(name, tuple(out.shape) if isinstance(out, torch.Tensor) else ())
            tensor = _first_tensor(out)
            if tensor is None or not tensor.is_floating_point():
                return
            if self._generator is None or self._generator.device != tensor.device:
                self._generator = torch.Generator(device=tensor.device).manual_seed(self._seed)
                if self._generator_state is not None:
                    self._generator.set_state(self._generator_state)
            samples = max(1, self.samples // self.processes)  # the processes' subsamples make up one
            self._current[name] = deferred_or_partial(tensor, samples, self._generator, self._workspace)  # these detach the output
            if self.per_channel and tensor.dim() >= 2:
                self._current_channel[name] = partial_moments(tensor, True, samples, self._generator, self._workspace)
            if self.histogram_bins:
                self._current_hist[name] = histogram(tensor, self.histogram_bins, *self.histogram_range)

        return hook

    def __enter__(self) -> Recorder:
        self._order_fixed = False
        self._seen_shapes: dict[str, tuple[int, ...]] = {}
        self._shard_batch: int | None = None
        self._hooks = [(m, self._hook(n)) for n, m in self._candidates]
        self._arm()
        return self

    def _arm(self) -> None:
        """Hooks on the layers for a record step's forward, none otherwise: a module without hooks
        takes torch's fast path, so the steps between records cost what a plain loop does."""
        record = self.step_index % self.record_every == 0
        if record and not self._handles:
            self._handles = [m.register_forward_hook(hook) for m, hook in self._hooks]
            if self.processes > 1:
                self._handles.append(self.model.register_forward_pre_hook(self._see_batch))
            if not self._order_fixed:
                self._handles.append(self.model.register_forward_pre_hook(self._watch_order))
                self._handles.append(self.model.register_forward_hook(self._order_seen, always_call=True))
        elif not record:
            self._disarm()

    def _disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._flow.close()

    def _watch_order(self, _module: nn.Module, _args: Any) -> None:
        """The forward order of the first recorded forward of the whole model: the order in which the
        layers' hooks fire is that of the ends of their calls, not the data flow of nested layers."""
        if not self._order_fixed and not self._flow_order and not measuring():
            self._flow_order = self._flow.enter_context(first_calls(self.model, self._candidates))

    def _order_seen(self, _module: nn.Module, _args: Any, _out: Any) -> None:
        self._flow.close()  # first_calls puts the list it gave in order

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.close(Status.FINISHED if exc_type is None else Status.INTERRUPTED)  # an exception stopped the user's loop early

    # -------------------------------------------------------------- steps

    def _fix_order(self) -> None:
        """The layers table, in the order of first calls in the first recorded forward pass."""
        by_name = dict(self._candidates)
        flow = {name: i for i, (name, _, _) in enumerate(self._flow_order)}
        names = sorted((n for n in self._current if n in by_name), key=lambda n: flow.get(n, len(flow)))
        self._order = [(n, by_name[n]) for n in names]
        self.layers = [
            LayerInfo(n, layer_kind(m), sum(p.numel() for p in own_parameters(m)), self._global_shape(n), i)
            for i, (n, m) in enumerate(self._order)
        ]
        self.writer.set_layers(self.layers)
        self._order_fixed = True

    def _global_shape(self, name: str) -> tuple[int, ...]:
        """A layer's output shape for the whole batch, as the merged moments describe the whole:
        each process saw its shard of the batch (dim 0 of the model's input), so the dimension of
        the shard's size (dim 0 where that is one, else the first: a sequence-first layer's dim 1)
        is the processes' times larger; an output without one (a positional table) is the same."""
        shape = self._seen_shapes.get(name, ())
        if self.processes == 1:
            return shape
        dims = [i for i, size in enumerate(shape) if size == self._shard_batch]
        if not dims:
            return shape
        i = 0 if 0 in dims else dims[0]
        return (*shape[:i], shape[i] * self.processes, *shape[i + 1 :])

    def _see_batch(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        """The shard's batch size, from the model's input, until the layer order is fixed."""
        if not self._order_fixed and (x := _first_tensor(args)) is not None and x.dim() > 0:
            self._shard_batch = x.shape[0]

    def step(self, loss: Any = None, accuracy: Any = None, lr: float | None = None) -> None:
        """Close one training step: log its scalars and, on record steps, its layers' moments."""
        if not self._order_fixed and self._current:
            self._fix_order()
        seconds = self.elapsed()
        self._train_rows.append((self.step_index, _detach(loss), _detach(accuracy), lr, seconds))
        recorded = self._partials()
        record_step = self.step_index % self.record_every == 0
        if self.processes > 1 and record_step:  # every process, whatever it recorded: the merge's sizes must agree
            distributed.check_same_everywhere(self._layout(recorded), f"the layers recorded at step {self.step_index} or their shapes")
        if self._order_fixed and record_step and recorded:
            # A layer that did not run this step (a skipped branch) gets NaN statistics and an empty
            # histogram, so the other layers' records of the step are kept.
            stats = self._finished(recorded)
            like = next(iter(stats.values()))
            missing = torch.full_like(like, float("nan"))
            table = torch.stack([stats.get(n, missing) for n, _ in self._order], dim=1)
            channels = self._finished(self._current_channel)
            hist = None
            if self.histogram_bins:
                no_counts = torch.zeros(self.histogram_bins, device=like.device)
                hist = torch.stack([self._current_hist.get(n, no_counts) for n, _ in self._order])
                if self.processes > 1:
                    distributed.sum_(hist)
            self._pending.append((self.step_index, table, channels, hist))
        self._current, self._current_channel, self._current_hist = {}, {}, {}
        self.step_index += 1
        self._arm()
        if len(self._train_rows) >= self.flush_every or time.perf_counter() - self._last_flush >= self.flush_seconds:
            self.flush()

    def _partials(self) -> dict[str, Partial]:
        """This step's statistics by layer, those left waiting (small layers, large layers' sums) made together now."""
        waiting = [(n, p) for n, p in self._current.items() if not isinstance(p, Partial)]
        done = dict(zip((n for n, _ in waiting), partials_together([p for _, p in waiting], self._workspace)))
        return {n: p if isinstance(p, Partial) else done[n] for n, p in self._current.items()}

    def _layout(self, recorded: dict[str, Partial]) -> object:
        """What must be alike in every process before their statistics are exchanged: the layer
        order, and each recorded layer's (and channel table's) sizes."""

        def sizes(parts: dict[str, Partial]) -> list[object]:
            return [(n, parts[n].n, tuple(parts[n].raw.shape), tuple(parts[n].sample.shape)) for n, _ in self._order if n in parts]

        return self._order_fixed, [n for n, _ in self._order], sizes(recorded), sizes(self._current_channel)

    def _finished(self, parts: dict[str, Partial]) -> dict[str, torch.Tensor]:
        """``STATS`` of the layers in ``parts``, in the layers' order (the same in every process),
        of the global batch when merged across processes."""
        names = [n for n, _ in self._order if n in parts]
        ordered = [parts[n] for n in names]
        if self.processes > 1:
            ordered = merged_across_processes(ordered)
        return dict(zip(names, finish_all(ordered)))

    def flush(self) -> None:
        """Move buffered statistics to the host (one transfer) and append them to the file."""
        for step, loss, acc, lr, seconds in self._train_rows:
            row = {"loss": _float(loss), "accuracy": _float(acc), "lr": np.nan if lr is None else lr, "seconds": seconds}
            self.writer.append("train", step, row)
        self._train_rows = []
        if self._pending:
            tables = torch.stack([t for _, t, _, _ in self._pending]).cpu().numpy()
            for (step, _, per_layer, hist), table in zip(self._pending, tables):
                values: dict[str, Any] = {stat: table[i] for i, stat in enumerate(STATS)}
                if hist is not None:
                    values["histogram"] = hist.cpu().numpy()
                self.writer.append("moments", step, values)
                for name, s in per_layer.items():
                    arr = s.cpu().numpy()
                    self.writer.append(f"moments/per_channel/{name}", step, {stat: arr[i] for i, stat in enumerate(STATS)})
            self._pending = []
            if self.histogram_bins:
                self.writer.set_attrs(histogram_range=list(self.histogram_range), histogram_bins=self.histogram_bins)
        self.writer.flush()
        self._last_flush = time.perf_counter()

    def close(self, status: Status | str = Status.FINISHED) -> None:
        """Remove the hooks, flush, and close the file if this recorder opened it (marking the run
        ``status`` unless its owner already set one)."""
        self._disarm()
        self.flush()
        if self._owned_store is not None:
            if self.writer._group.attrs.get("status") == Status.RUNNING:
                self.writer.set_status(status, steps=self.step_index)
            self._owned_store.close()
            self._owned_store = None


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _float(value: Any) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if isinstance(value, torch.Tensor) else value)
