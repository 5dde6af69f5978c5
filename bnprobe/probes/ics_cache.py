"""The call cache behind fast ICS's prefix sharing (:func:`bnprobe.probes.ics.gradient_shift`).

One no-grad forward with the updated weights records the output of every module call; in the pass
for layer i, a call whose result only depends on updated weights returns its recorded output
instead of running, so each pass costs only the suffix from layer i on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..rng import RngState, Streams

_OFF, _RECORD, _REPLAY = 0, 1, 2


class CallCache:
    """Records every module call of a no-grad forward with updated weights and serves the calls
    that only depend on updated weights back to later passes without running them.

    Calls are numbered in the order they start; ``end[c]`` is one past the last call nested in c.
    ``reach[c]`` is the latest layer whose parameters may have been read by the time call c ends
    (the modules of every call started by then, its open ancestors and the root included). Call c
    is served in the pass for layer i iff ``reach[c] < i``: everything it depends on then holds
    W^{t+1}, exactly as in the recording pass. A model whose modules cannot be patched (scripted
    modules) is run uncached.
    """

    def __init__(self, model: nn.Module, reach: Mapping[int, int], horizon: int, streams: Streams) -> None:
        self.model = model
        self.layer_reach = reach  # id(module) -> the latest layer whose parameters it holds (-1: none)
        self.horizon = horizon  # no measured layer beyond this: later calls are never served
        self.streams = streams
        self.mode = _OFF
        self.seq: list[nn.Module] = []
        self.end: list[int] = []
        self.reach: list[int] = []
        self.out: list[Any] = []
        self.flat: list[list[torch.Tensor]] = []
        self.rng_after: list[RngState | None] = []
        self.pos = 0
        self.limit = -1
        self.synced = True
        self.served: list[int] = []
        self.disabled = False
        self._running = self._reach_of(model)
        self._memo: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _reach_of(self, m: nn.Module) -> int:
        if id(m) in self.layer_reach:
            return self.layer_reach[id(m)]
        # parameters outside every ordered layer: treat as "never before anything"
        return 1 << 30 if any(p.requires_grad for p in m.parameters(recurse=False)) else -1

    @contextmanager
    def installed(self) -> Iterator[CallCache]:
        patched: list[tuple[nn.Module, bool, Any]] = []
        try:
            try:
                for m in self.model.modules():
                    if m is self.model:
                        continue
                    had = "forward" in m.__dict__
                    wrapped = self._wrap(m, m.forward)
                    patched.append((m, had, m.__dict__.get("forward")))
                    object.__setattr__(m, "forward", wrapped)
            except (AttributeError, TypeError, RuntimeError):
                self.disabled = True
            yield self
        finally:
            self.mode = _OFF
            for m, had, fwd in patched:
                if had:
                    object.__setattr__(m, "forward", fwd)
                else:
                    object.__delattr__(m, "forward")

    def _clone(self, out: Any) -> Any:
        def one(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            key = (id(t), t._version)
            hit = self._memo.get(key)
            if hit is None:
                hit = (t, t.detach().clone())
                self._memo[key] = hit
            return hit[1]

        return tree_map(one, out)

    def _wrap(self, m: nn.Module, fwd: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.mode == _RECORD:
                pos = len(self.seq)
                self.seq.append(m)
                self.end.append(-1)
                self.reach.append(-1)
                self.out.append(None)
                self.flat.append([])
                self.rng_after.append(None)
                self._running = max(self._running, self._reach_of(m))
                before = self.streams.capture()
                result = fwd(*args, **kwargs)
                self.end[pos] = len(self.seq)
                self.reach[pos] = self._running
                if self._running < self.horizon:
                    self.out[pos] = self._clone(result)
                    self.flat[pos] = [t for t in tree_flatten(self.out[pos])[0] if isinstance(t, torch.Tensor)]
                    after = self.streams.capture()
                    if not before.same(after):
                        self.rng_after[pos] = after
                return result
            if self.mode == _REPLAY and self.synced:
                pos = self.pos
                if pos >= len(self.seq) or self.seq[pos] is not m:
                    self.synced = False  # the calls no longer line up: run the rest uncached
                    return fwd(*args, **kwargs)
                if self.reach[pos] < self.limit and self.out[pos] is not None:
                    self.pos = self.end[pos]
                    drawn = self.rng_after[pos]
                    if drawn is not None:
                        self.streams.restore(drawn)
                    self.served.append(pos)
                    return self.out[pos]
                self.pos += 1
            return fwd(*args, **kwargs)

        return forward

    def record(self, x: Any) -> None:
        if self.disabled:
            return
        self.mode = _RECORD
        try:
            with torch.no_grad():
                self.model(x)
        finally:
            self.mode = _OFF
            self._memo.clear()

    @contextmanager
    def replay(self, layer: int) -> Iterator[None]:
        self.mode, self.pos, self.limit, self.synced, self.served = _REPLAY, 0, layer, not self.disabled, []
        try:
            yield
        finally:
            self.mode = _OFF

    def drop_mutated(self) -> None:
        """A recorded output that an in-place op changed is no longer the recorded value: forget it.

        Only served outputs can change, but one clone can back several calls: drop every call
        whose output holds a changed tensor.
        """
        changed = {id(t) for pos in self.served for t in self.flat[pos] if t._version != 0}
        if changed:
            for pos, ts in enumerate(self.flat):
                if self.out[pos] is not None and any(id(t) in changed for t in ts):
                    self.out[pos] = None
