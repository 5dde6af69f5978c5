"""Passes that leave no trace: the one way bnprobe runs a model outside the training step.

Layer discovery, the surgery planning pass, the output check and every measurement pass (ICS,
landscape, Hessian) run the user's model on a real batch. Such a pass must change nothing the
training run sees:

- BatchNorm's running statistics: ``track_running_stats`` is switched off on train-mode norm
  layers (train-mode BN then normalises with batch statistics and updates nothing);
- every buffer a forward updates in place (spectral norm's ``_u``/``_v``, InstanceNorm's running
  statistics, user EMA buffers, a BN's statistics that other code passes to ``F.batch_norm``):
  put back on exit, written only where it changed;
- every random stream (global CPU/CUDA, noisy BN's own generators): put back on exit;
- the backward of a pass: :func:`gradients` refuses a model whose forward reruns in it (activation
  checkpointing recomputes outside these contexts, with the model's own weights, BN mode and
  running statistics, so a measurement through it would be silently wrong);
- the Recorder: :func:`measuring` is true inside, so its hooks skip these calls. It is a
  :class:`~contextvars.ContextVar`, not a global counter, so nested passes and threads are exact.

``bn_mode`` optionally runs the pass with every norm layer in ``train`` or ``eval`` mode (the
Hessian's explicit BN mode) and restores each layer's own mode after.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .errors import ConfigError, ModelError
from .rng import RngState, Streams

BN_MODES = ("train", "eval")
_MEASURING: ContextVar[bool] = ContextVar("bnprobe_measuring", default=False)


def measuring() -> bool:
    """True while a pass that must leave no trace runs (hooks that record training skip it)."""
    return _MEASURING.get()


class Buffers:
    """The buffers a forward may update in place. BN's are among them: switching
    ``track_running_stats`` off keeps a BN's own forward from moving them, but not other code that
    hands them to ``F.batch_norm`` in training mode (a parent reading its child BN's statistics)."""

    def __init__(self, model: nn.Module) -> None:
        where: dict[int, list[tuple[nn.Module, str]]] = {}  # each buffer tensor's (module, name) slots, aliases together
        for m in model.modules():
            for name, b in m.named_buffers(recurse=False):
                where.setdefault(id(b), []).append((m, name))
        self.slots = list(where.values())

    def current(self) -> list[torch.Tensor]:
        """The tensors the slots hold now: a forward may have put new ones there (``self.n = self.n + 1``)."""
        return [getattr(m, name) for (m, name), *_ in self.slots]

    def snap(self) -> list[torch.Tensor]:
        return [b.clone() for b in self.current()]

    def set(self, values: list[torch.Tensor]) -> None:
        """Write back only the buffers that differ (one host sync for all): a copy bumps a buffer's
        version, and an index buffer saved by autograd (LeViT's attention-bias indices) would then
        break a later backward through the pass's graph (the Hessian's double backward). A buffer
        the forward resized (a fake-quant observer's ``min_val``, empty until the first call) or
        replaced is replaced by a copy of its value: a copy into it cannot restore its shape."""
        now = self.current()
        if not now:
            return
        with torch.no_grad():
            device = now[0].device
            kept = [i for i, (b, v) in enumerate(zip(now, values)) if b.shape == v.shape and b.dtype == v.dtype]
            differs = torch.stack([(now[i] != values[i]).any().to(device) for i in kept]).tolist() if kept else []
            changed = dict(zip(kept, differs))
            for i, (slots, b, v) in enumerate(zip(self.slots, now, values)):
                if i not in changed:
                    fresh = v.clone()
                    for m, name in slots:
                        setattr(m, name, fresh)
                elif changed[i]:
                    b.copy_(v)


@dataclass
class Trace:
    """What a pass may touch, as it was on entry; a caller replaying several passes (ICS, the
    landscape) sets the buffers and streams back to a start state before each one."""

    buffers: Buffers
    streams: Streams
    entry_buffers: list[torch.Tensor] = field(default_factory=list)
    entry_streams: RngState | None = None

    def reset(self, buffers: list[torch.Tensor] | None = None, streams: RngState | None = None) -> None:
        """Buffers and streams as on entry (or as given): each replayed pass starts alike."""
        self.buffers.set(self.entry_buffers if buffers is None else buffers)
        state = self.entry_streams if streams is None else streams
        if state is not None:
            self.streams.restore(state)


@contextmanager
def _norm_modes(model: nn.Module, bn_mode: str | None) -> Iterator[None]:
    if bn_mode is None:
        yield
        return
    if bn_mode not in BN_MODES:
        raise ConfigError(f"unknown BN mode {bn_mode!r}; choose from {', '.join(BN_MODES)}")
    norms = [(m, m.training) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    try:
        for m, _ in norms:
            m.train(bn_mode == "train")
        yield
    finally:
        for m, was in norms:
            m.train(was)


@contextmanager
def leave_no_trace(model: nn.Module, bn_mode: str | None = None) -> Iterator[Trace]:
    """Run the block's passes over ``model`` so that no buffer, BN statistic or random stream moves.

    Gradients are the caller's business (wrap in ``torch.no_grad()`` when none are needed).
    """
    with _norm_modes(model, bn_mode):
        # Only train-mode ones: an eval-mode InstanceNorm would switch to per-sample statistics.
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.training]
        flags = [(m, m.track_running_stats) for m in norms]
        trace = Trace(Buffers(model), Streams(model))
        trace.entry_buffers, trace.entry_streams = trace.buffers.snap(), trace.streams.capture()
        token = _MEASURING.set(True)
        try:
            for m in norms:
                m.track_running_stats = False
            yield trace
        finally:
            _MEASURING.reset(token)
            for m, flag in flags:
                m.track_running_stats = flag
            trace.reset()


def materialise(model: nn.Module, example_input: object) -> None:
    """Give lazy modules (``LazyConv2d``, ``LazyBatchNorm2d``) their tensors with one plain forward
    before anything copies the model or runs a pass on it (a deep copy of an uninitialised parameter
    fails, and a lazy BN's first call must not be one with its statistics switched off). It runs in
    eval mode without gradients, random streams put back: nothing but the lazy tensors changes."""
    if not any(isinstance(m, LazyModuleMixin) and m.has_uninitialized_params() for m in model.modules()):
        return
    modes = [(m, m.training) for m in model.modules()]
    streams = Streams(model)
    state = streams.capture()
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        streams.restore(state)
        for m, was in modes:
            m.training = was


def refuse_scripted(model: nn.Module) -> None:
    """Refuse, by name, a TorchScript module inside ``model``: bnprobe sees a model through module
    hooks, which TorchScript modules do not take ("register_forward_hook is not supported")."""
    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            raise ModelError(
                f"{name or type(model).__name__} is a TorchScript module (torch.jit.script), which takes no hooks: "
                "bnprobe cannot see inside it; pass the module before scripting"
            )


_CHECKPOINTED = "runs its forward again during backward (activation checkpointing, torch.utils.checkpoint)"
_REFUSED = "bnprobe's measurement passes cannot hold there; measure the model without checkpointing"


@contextmanager
def refusing_recomputation(model: nn.Module) -> Iterator[None]:
    """Stop a backward run in the block at the first module forward inside it, with one line.

    Activation checkpointing (``torch.utils.checkpoint``) reruns its block's forward in backward,
    after a pass's swapped weights, BN switches and replayed random streams are gone: gradients of
    the wrong model (or torch's ``CheckpointError``). A pre-hook on every module sees the rerun."""
    refuse_scripted(model)
    names = {m: n for n, m in model.named_modules()}

    def refuse(module: nn.Module, _args: object) -> None:
        raise ModelError(f"{names.get(module) or type(module).__name__!r} {_CHECKPOINTED}: {_REFUSED}")

    handles = [m.register_forward_pre_hook(refuse) for m in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def gradients(
    model: nn.Module, loss: torch.Tensor, inputs: Sequence[torch.Tensor], create_graph: bool = False
) -> tuple[torch.Tensor | None, ...]:
    """d ``loss`` / d ``inputs`` (None where it does not depend on one) for a pass's backward, under
    :func:`refusing_recomputation`; torch's own refusal of reentrant checkpointing in ``grad``
    becomes the same one line."""
    with refusing_recomputation(model):
        try:
            return torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)
        except RuntimeError as e:
            if "torch.utils.checkpoint" in str(e):
                raise ModelError(f"{type(model).__name__} {_CHECKPOINTED}: {_REFUSED}") from None
            raise
