"""Activation moments: statistics of each probed layer's output, computed on the
device in float32 or wider, with no host synchronisation until the recorder flushes.

Conventions (the tests check them against numpy):
- ``var`` is the population variance (divide by n); ``skewness`` = m3 / m2^1.5 and ``kurtosis``
  is the *excess* kurtosis m4 / m2^2 - 3, from central moments m_k; 0 when the variance is 0.
- ``zero_fraction`` counts exact zeros (dead ReLUs, pruned units).
- ``p15``, ``p50``, ``p85`` are linear-interpolation quantiles of a uniform random subsample of
  ``samples`` elements drawn with replacement (all elements when there are fewer), Ioffe &
  Szegedy's percentiles; 16,384 samples put a percentile within ~0.004 (sqrt(p(1-p)/n)) in probability.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, cast

import torch

from ..store import STATS
from .ragged import levels, padded, quantiles

DEFAULT_SAMPLES = 16384


def _subsample(flat: torch.Tensor, samples: int, generator: torch.Generator | None) -> torch.Tensor:
    """``flat`` is [rows, n]; pick ``samples`` columns (with replacement) when n is larger."""
    n = flat.shape[-1]
    if n <= samples:
        return flat
    idx = torch.randint(n, (samples,), device=flat.device, generator=generator)
    return flat.index_select(-1, idx)


class Workspace:
    """Scratch tensors reused from one call to the next. On CPU fresh temporaries cost more in page
    faults than the arithmetic done in them, so the Recorder keeps one of these for all its layers.

    With ``compiled``, a layer's own reductions (those of a layer over ``SMALL`` values, or per
    channel; the small ones are reduced together) run as one ``torch.compile``d kernel: faster per
    record step, but compiling takes a while once, so it pays in long runs that record often
    (benchmarks/RESULTS.md has the figures). Where compiling fails (no C++ compiler, an
    unsupported device) it warns once and stays eager.
    """

    def __init__(self, compiled: bool = False) -> None:
        self._buffers: dict[tuple[str, torch.dtype, int], torch.Tensor] = {}
        self.compiled = compiled
        self._kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def fused(self, flat: torch.Tensor, shift: torch.Tensor) -> torch.Tensor | None:
        """:func:`_fused_moments` of ``flat`` by the compiled kernel; None when not compiled (or it failed)."""
        if not self.compiled:
            return None
        if self._kernel is None:
            self._kernel = torch.compile(_fused_moments, dynamic=True)
        try:
            return self._kernel(flat, shift)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: the eager path, which gives the same statistics
            warnings.warn(f"bnprobe: compiled moments unavailable ({type(e).__name__}); computing them eagerly", stacklevel=2)
            self.compiled = False
            return None

    def take(self, slot: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of ``shape``, the same memory each time for the same ``slot``."""
        numel = math.prod(shape)
        key = (str(device), dtype, slot)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel].view(shape)


def _channels_first(x: torch.Tensor, workspace: Workspace | None) -> torch.Tensor:
    """``[channels, everything else]``: the contiguous copy ``x.transpose(0, 1).reshape(C, -1)``
    makes, made into reused memory."""
    moved = x.transpose(0, 1)
    if workspace is None:
        return moved.reshape(x.shape[1], -1)
    return workspace.take(3, tuple(moved.shape), x.dtype, x.device).copy_(moved).view(x.shape[1], -1)


def _accumulator(flat: torch.Tensor) -> torch.dtype:
    """The dtype sums are added in: float64, except on Apple's MPS, which has none."""
    return flat.dtype if flat.device.type == "mps" else torch.float64


def _reach(lo: torch.Tensor, hi: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per row, the largest distance of a value from ``shift``, in the accumulator's dtype."""
    wide = _accumulator(lo)
    return torch.maximum(hi.to(wide) - shift.to(wide), shift.to(wide) - lo.to(wide))


def _scale(lo: torch.Tensor, hi: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per row, a power of two that values less ``shift`` are divided by before their powers are
    taken, so that fourth powers neither overflow nor underflow (an activation at 1e9 had kurtosis
    inf): 1 where :func:`_reach` is within 2^-16..2^16 (no need), else the power of two just above
    it (never so small that its inverse overflows ``lo``'s dtype). Dividing by a power of two
    rounds nothing. One row on CPU (a whole layer's) in Python's doubles: the same values, for a
    tenth of what a dozen operations on single values cost."""
    smallest = math.frexp(torch.finfo(lo.dtype).tiny)[1] + 1
    if lo.device.type == "cpu" and lo.numel() == 1:
        up, down = hi.item() - shift.item(), shift.item() - lo.item()
        power = math.frexp(up if up >= down or math.isnan(up) else down)[1]  # NaN wins, as in torch.maximum
        return torch.tensor([1.0 if abs(power) <= 16 else math.ldexp(1.0, max(power, smallest))], dtype=torch.float64)
    reach = _reach(lo, hi, shift)
    exponent = torch.frexp(reach).exponent
    return torch.ldexp(torch.ones_like(reach), torch.where(exponent.abs() <= 16, 0, exponent.clamp(min=smallest)))


def standardised(d: torch.Tensor, s2: torch.Tensor, s3: torch.Tensor, s4: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Variance (of the scaled values), skewness and excess kurtosis from the means s_k of c^k, c
    the scaled values less a shift that is d off their mean: m2 = s2 - d^2, m3 = s3 - 3 d s2 + 2 d^3,
    m4 = s4 - 4 d s3 + 6 d^2 s2 - 3 d^4. Skewness and kurtosis are 0 where the variance is."""
    m2 = s2 - d * d
    m3 = s3 - 3 * d * s2 + 2 * d**3
    m4 = s4 - 4 * d * s3 + 6 * d * d * s2 - 3 * d**4
    spread = m2 > 0
    safe = torch.where(spread, m2, torch.ones_like(m2))
    skew = torch.where(spread, m3 / (safe * safe.sqrt()), torch.zeros_like(m2))  # pow(1.5)'s last bit depends on the position
    kurt = torch.where(spread, m4 / (safe * safe) - 3.0, torch.zeros_like(m2))
    return m2, skew, kurt


def _fused_moments(flat: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``[mean, var, skewness, excess kurtosis, min, max, zero fraction]`` per row of ``flat`` as
    plain formulas: ``torch.compile`` fuses them into passes over the data and no temporary.
    The compiled reductions add in one accumulator per vector lane, so they sum in float64: in
    float32 the kurtosis of a large activation came out visibly off, for a modest extra cost.

    Values are taken less ``shift`` (per row, in float64: near the mean, the percentile
    subsample's, so no pass over the data for the mean comes first) and the shift's offset from
    the mean, d = mean(c), is taken out by :func:`standardised`. Float32 values' fourth powers
    fit float64's range, so every reduction is of the data as it is: one pass. Data as wide as
    the accumulator (float64, or float32 on MPS) is divided by :func:`_reach` first (inductor
    cannot compile ``frexp``; the division's rounding is far below the data's), a pass for the
    extremes first. A row holding an infinity gets the mean its sum gives (inf or NaN) whatever
    the subsample held."""
    n = flat.shape[1]
    wide = flat.to(_accumulator(flat))
    lo, hi = flat.amin(1), flat.amax(1)
    centred = wide - shift[:, None]
    scale = torch.ones_like(shift)
    if wide.dtype == flat.dtype:
        reach = _reach(lo, hi, shift)
        scale = torch.where(reach > 0, reach, scale)
        centred = centred / scale[:, None]
    sq = centred * centred
    zeros = (flat == 0).sum(dim=1).to(flat.dtype) / n
    d = centred.sum(dim=1) / n
    m2, skew, kurt = standardised(d, sq.sum(dim=1) / n, (sq * centred).sum(dim=1) / n, (sq * sq).sum(dim=1) / n)
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    mean = torch.where(finite, shift + d * scale, wide.sum(dim=1) / n)  # inf or NaN as the data says, whatever the sample held
    moments = torch.stack([mean, m2 * scale * scale, skew, kurt]).to(flat.dtype)
    return torch.cat([moments, torch.stack([lo, hi, zeros])])


_CPU_BLOCK = 1 << 18  # elements per block of the eager path on CPU: 1 MB of float32 per temporary
_DEVICE_BLOCK = 1 << 24  # elsewhere: float32 adds ones (zeros counted) exactly up to this, and a block's five powers take 320 MB at most


def _blocks(rows: int, n: int, block: int) -> Iterator[tuple[int, int, int, int]]:
    """``(row start, row end, column start, column end)`` of ``[rows, n]`` in pieces of about
    ``block`` elements: whole rows together while they are shorter, else parts of one row."""
    if n >= block:
        for r in range(rows):
            for c in range(0, n, block):
                yield r, r + 1, c, min(c + block, n)
    else:
        together = block // n
        for r in range(0, rows, together):
            yield r, min(r + together, rows), 0, n


class Sums(NamedTuple):
    """Per row, what :func:`_moments_from_sums` makes the moments from: a few dozen operations on
    values this small cost a layer more than its data's passes, so large layers' wait for theirs
    to be done for all of them at once (:func:`partials_together`)."""

    shift: torch.Tensor  # [rows], the data's dtype
    scale: torch.Tensor
    means: torch.Tensor  # [5, rows]: of c, c^2, c^3, c^4 and zeros
    lo: torch.Tensor
    hi: torch.Tensor


def _eager_moments(flat: torch.Tensor, workspace: Workspace | None) -> torch.Tensor:
    """What :func:`_fused_moments` gives, eagerly (:func:`_eager_sums`, then the moments)."""
    return _moments_from_sums(*_eager_sums(flat, workspace)).to(flat.dtype)


def _eager_sums(flat: torch.Tensor, workspace: Workspace | None) -> Sums:
    """The :class:`Sums` of each row of ``flat``: after the means and extremes, one pass in blocks
    that stay in the CPU's cache (of ``_DEVICE_BLOCK`` elsewhere), with values centred on the mean as
    ``flat``'s dtype rounds it and scaled by :func:`_scale`. Each block's sums of c, c^2, c^3 and
    c^4 (c the centred values, squares and products in reused memory) are added in float64, and the
    mean's rounding d = sum(c) / n is taken out there (:func:`standardised`). Without that, data far from zero with a small spread had a visibly
    wrong skewness, and a constant channel a tiny nonzero variance with skewness and kurtosis
    far from 0; with it, the constant's offset c is a few units in its last place, whose powers
    float32 holds exactly: moments of 0.

    The sums are torch's (cascaded): a BLAS dot product, which saves a temporary, put the kurtosis
    of a large activation far off. Blocks that stay in cache pay for the extra passes: a record
    step costs about what the old, inaccurate passes over whole activations did, and per-channel
    statistics less."""
    rows, n = flat.shape
    block = _CPU_BLOCK if flat.device.type == "cpu" else _DEVICE_BLOCK
    shift = flat.sum(dim=1) / n
    if rows == 1:  # a whole-tensor reduction is several times faster than a dim=1 one on CPU
        lo, hi = (extreme.reshape(1) for extreme in torch.aminmax(flat))
    else:
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    scale = _scale(lo, hi, shift)
    rescale = flat.device.type != "cpu" or bool((scale != 1).any())  # on CPU asking costs nothing, a pass does
    inverse = (1 / scale).to(flat.dtype)[:, None] if rescale else None
    sums = torch.zeros(5, rows, dtype=_accumulator(flat), device=flat.device)  # of c, c^2, c^3, c^4 and zeros
    for r0, r1, c0, c1 in _blocks(rows, n, block):
        part = flat[r0:r1, c0:c1]
        powers = _reused(workspace, 0, (5, *part.shape), part)
        sums[:, r0:r1] += _power_sums(part, shift[r0:r1, None], None if inverse is None else inverse[r0:r1], powers)
    return Sums(shift, scale, sums / n, lo, hi)


def _reused(workspace: Workspace | None, slot: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Memory of ``shape`` in ``like``'s dtype and device: the workspace's ``slot``, or fresh without one."""
    if workspace is None:
        return like.new_empty(shape)
    return workspace.take(slot, shape, like.dtype, like.device)


def _power_sums(
    part: torch.Tensor, shift: torch.Tensor, inverse: torch.Tensor | None, powers: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """``[5, rows]``: per row of ``part``, the sums of c, c^2, c^3 and c^4, c = (part - shift),
    times ``keep`` (1 at values, 0 at padding) and ``inverse`` where given, and of the exact zeros
    of ``part`` (-0.0 too, not NaN). All five are written into ``powers`` (``[5, *part.shape]``) and
    reduced by one call; zeros are counted as ones of the data's dtype, on CPU a third of the time
    or less of a boolean mask and ``count_nonzero``, exactly for rows of up to 2^24 values, as
    every block is."""
    centred = torch.sub(part, shift, out=powers[0])
    if keep is not None:
        centred.mul_(keep)
    if inverse is not None:
        centred.mul_(inverse)
    sq = torch.mul(centred, centred, out=powers[1])
    torch.mul(sq, centred, out=powers[2])
    torch.mul(sq, sq, out=powers[3])
    torch.eq(part, 0, out=powers[4])
    return powers.sum(-1)


def _moments_from_sums(shift: torch.Tensor, scale: torch.Tensor, means: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``[mean, var, skewness, excess kurtosis, min, max, zero fraction]`` from the means of c, c^2,
    c^3, c^4 and zeros (c the values less ``shift``, divided by ``scale``), the mean's rounding
    d = mean(c) taken out as :func:`standardised` says."""
    d, s2, s3, s4, zeros = means
    wide = scale.to(d.dtype)
    m2, skew, kurt = standardised(d, s2, s3, s4)
    return torch.stack([shift.to(d.dtype) + d * wide, m2 * wide * wide, skew, kurt, lo.to(d.dtype), hi.to(d.dtype), zeros])


class Partial(NamedTuple):
    """One shard's statistics before the ones that do not merge (skewness, kurtosis, percentiles):
    what processes exchange so that the merged statistics are the global batch's."""

    raw: torch.Tensor  # [7] or [7, rows]: mean, var, skewness, excess kurtosis, min, max, zero fraction
    sample: torch.Tensor  # [s] or [rows, s]: the percentile subsample (owned, not a view of scratch memory)
    n: int  # elements per row


def partial_moments(
    x: torch.Tensor,
    per_channel: bool = False,
    samples: int = DEFAULT_SAMPLES,
    generator: torch.Generator | None = None,
    workspace: Workspace | None = None,
) -> Partial:
    """The mergeable statistics of ``x`` (see :func:`moment_stats` for the arguments)."""
    flat = _rows(x, per_channel, workspace)
    rows = per_channel and x.dim() >= 2
    n = flat.shape[1]
    if n == 0:  # an empty activation (a zero-size feature map) has no statistics: NaN, not a crash
        raw = torch.full((7, flat.shape[0]), float("nan"), dtype=flat.dtype, device=flat.device)
        return Partial(raw if rows else raw[:, 0], flat if rows else flat[0], 0)
    sample = _owned_subsample(flat, samples, generator)
    fused = workspace.fused(flat, _mean(sample, _accumulator(flat))) if workspace is not None and workspace.compiled else None
    raw = fused if fused is not None else _eager_moments(flat, workspace)
    return Partial(raw if rows else raw[:, 0], sample if rows else sample[0], n)


def _mean(sample: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per row of ``sample`` (``[rows, s]``), its mean in ``dtype``."""
    return sample.sum(dim=-1, dtype=dtype) / sample.shape[-1]


def _rows(x: torch.Tensor, per_channel: bool, workspace: Workspace | None) -> torch.Tensor:
    """``x`` as ``[rows, n]`` in float32 or wider: one row, or one per channel (dim 1)."""
    x = x.detach()
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    if per_channel and x.dim() > 2:
        return _channels_first(x, workspace)
    if per_channel and x.dim() == 2:
        return x.transpose(0, 1)  # a strided view, as reshape gives
    return x.reshape(1, -1)


def _owned_subsample(flat: torch.Tensor, samples: int, generator: torch.Generator | None) -> torch.Tensor:
    """:func:`_subsample`, a copy where it is all of ``flat`` (scratch memory is reused, and the
    forward may change its output in place after the hook)."""
    sample = _subsample(flat, samples, generator)
    return sample.clone() if sample.data_ptr() == flat.data_ptr() else sample


SMALL = 1 << 16  # elements: up to this, a layer's own reductions cost less than their fixed cost, so it waits for partials_together
_ROW = 256  # elements per row of partials_together's table: a layer wastes less than a row in padding


class Deferred(NamedTuple):
    """A small activation kept for :func:`partials_together`: an owned copy (the forward may
    change its output in place after the hook) and its percentile subsample, drawn now, in the
    order the layers run, so the subsample stream is the one computing each at once draws."""

    data: torch.Tensor  # [n], 0 < n <= SMALL
    sample: torch.Tensor


class Summed(NamedTuple):
    """A large activation's :class:`Sums` (one row), its subsample, and its size, kept for
    :func:`partials_together` to make the moments of all such layers with one set of formulas."""

    sums: Sums
    sample: torch.Tensor
    n: int


def deferred_or_partial(
    x: torch.Tensor, samples: int, generator: torch.Generator | None, workspace: Workspace | None = None
) -> Partial | Deferred | Summed:
    """Whole-tensor statistics of ``x``: a copy (one operation) to reduce later with the other
    small layers', for a larger ``x`` its sums (the moments made later, with the others'), or for
    an empty one (or one that the compiled kernel takes) :func:`partial_moments` now."""
    x = x.detach()
    if x.numel() > SMALL and not (workspace is not None and workspace.compiled):
        flat = _rows(x, False, workspace)
        return Summed(_eager_sums(flat, workspace), _owned_subsample(flat, samples, generator)[0], flat.shape[1])
    if not 0 < x.numel() <= SMALL:
        return partial_moments(x, False, samples, generator, workspace)
    data = x.reshape(-1).to(x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32, copy=True)
    return Deferred(data, _subsample(data, samples, generator))


@functools.lru_cache(maxsize=8)
def _table_layout(
    lengths: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For layers of ``lengths`` laid out in rows of ``_ROW``, each padded to whole rows: each
    row's layer, 1 at the values and 0 at the padding, 0 at the values and +inf at the padding
    (both ``[rows, _ROW]``: multiplying and adding by them is fast, unlike a boolean mask), each
    layer's padding and size (in the dtype sums are added in)."""
    rows = [-(-n // _ROW) for n in lengths]
    owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(rows))
    pads = torch.tensor([r * _ROW - n for r, n in zip(rows, lengths)], dtype=torch.float64)
    used = torch.tensor([n - (r - 1) * _ROW for r, n in zip(rows, lengths)])[owner]  # elements in each layer's last row
    last = torch.cat([torch.arange(r) == r - 1 for r in rows])
    padding = last[:, None] & (torch.arange(_ROW)[None, :] >= used[:, None])
    keep = torch.logical_not(padding).to(device=device, dtype=dtype)
    away = torch.where(padding, float("inf"), 0.0).to(device=device, dtype=dtype)
    sizes, acc = torch.tensor(lengths, dtype=torch.float64), _accumulator(keep)
    return owner.to(device), keep, away, pads.to(acc).to(device), sizes.to(acc).to(device)


def _raw_together(datas: Sequence[torch.Tensor], workspace: Workspace | None = None) -> torch.Tensor:
    """``[7, layers]``: :func:`_eager_moments` of each of ``datas`` (1-D, one dtype and device),
    for all at once: the layers in one table of rows, one reduction per row and statistic, the
    rows' sums added into their layers' in float64. A few dozen operations, whatever the count of
    layers; the padding is zeros, kept out of the sums, counts and extremes. The table and its
    temporaries are the workspace's memory: fresh ones cost more in page faults than the passes."""
    lengths = tuple(d.numel() for d in datas)
    owner, keep, away, pads, n = _table_layout(lengths, datas[0].dtype, datas[0].device)
    joined = _reused(workspace, 0, (sum(lengths) + 1,), datas[0])
    x = padded(datas, _ROW, 0.0, out=(joined, _reused(workspace, 4, (keep.numel(),), datas[0])))
    acc = _accumulator(x)
    powers = _reused(workspace, 0, (5, *x.shape), x)  # after joined is read: the same memory

    def per_layer(rows: torch.Tensor) -> torch.Tensor:  # [rows, k] -> [k, layers]
        return torch.zeros(len(lengths), rows.shape[1], dtype=acc, device=x.device).index_add_(0, owner, rows.to(acc)).t()

    shift = (per_layer(x.sum(1)[:, None])[0] / n).to(x.dtype)
    lo, hi = (
        torch.empty(len(lengths), dtype=x.dtype, device=x.device).scatter_reduce_(0, owner, extreme, how, include_self=False)
        for extreme, how in ((torch.add(x, away, out=powers[0]).amin(1), "amin"), (torch.sub(x, away, out=powers[0]).amax(1), "amax"))
    )
    scale = _scale(lo, hi, shift)
    rescale = x.device.type != "cpu" or bool((scale != 1).any())  # as in _eager_moments: no pass where no layer needs it
    inverse = (1 / scale).to(x.dtype).index_select(0, owner)[:, None] if rescale else None
    sums = per_layer(_power_sums(x, shift.index_select(0, owner)[:, None], inverse, powers, keep).t())
    sums[4] -= pads
    return _moments_from_sums(shift, scale, sums / n, lo, hi).to(x.dtype)


def partials_together(items: Sequence[Deferred | Summed], workspace: Workspace | None = None) -> list[Partial]:
    """The :class:`Partial` of each of ``items``, those of one kind, dtype and device together
    (the small layers' table in ``workspace``'s memory)."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, item in enumerate(items):
        like = item.data if isinstance(item, Deferred) else item.sums.shift
        groups.setdefault((type(item), like.dtype, like.device), []).append(i)
    out: dict[int, Partial] = {}
    for members in groups.values():
        first = items[members[0]]
        if isinstance(first, Deferred):
            raw = _raw_together([cast(Deferred, items[i]).data for i in members], workspace)
        else:
            columns = zip(*(cast(Summed, items[i]).sums for i in members))  # each field of every layer, one row each
            raw = _moments_from_sums(*(torch.cat(field, dim=-1) for field in columns)).to(first.sums.shift.dtype)
        for i, column in zip(members, raw.unbind(1)):
            item = items[i]
            out[i] = Partial(column, item.sample, item.data.numel() if isinstance(item, Deferred) else item.n)
    return [out[i] for i in range(len(items))]


def finish(part: Partial) -> torch.Tensor:
    """``STATS`` from a :class:`Partial`: its moments, and percentiles of the subsample."""
    if part.n == 0:
        return torch.full((len(STATS), *part.raw.shape[1:]), float("nan"), dtype=part.raw.dtype, device=part.raw.device)
    return _finished(part.raw, torch.quantile(part.sample, levels(part.sample), dim=-1))


def _finished(raw: torch.Tensor, pct: torch.Tensor) -> torch.Tensor:
    mean, var, skew, kurt, lo, hi, zeros = raw
    return torch.stack([mean, var, skew, kurt, lo, hi, zeros, pct[0], pct[1], pct[2]])


def finish_all(parts: Sequence[Partial]) -> list[torch.Tensor]:
    """:func:`finish` of each of ``parts``, to the bit, those of one dtype and device together: one
    quantile call and one set of formulas for all of them instead of one per layer (the
    deeper the model, the more it saves)."""
    out: dict[int, torch.Tensor] = {}
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, part in enumerate(parts):
        if part.n == 0:
            out[i] = finish(part)
        else:
            groups.setdefault((part.sample.dtype, part.raw.dtype, part.raw.device), []).append(i)
    for members in groups.values():  # a whole tensor's part is one column, a per-channel one a column per channel
        rows = [row for i in members for row in ([parts[i].sample] if parts[i].raw.dim() == 1 else parts[i].sample.unbind())]
        raws = [parts[i].raw for i in members]
        stats = _finished(torch.stack(raws, 1) if all(r.dim() == 1 for r in raws) else torch.column_stack(raws), quantiles(rows))
        columns, start = stats.unbind(1), 0  # one operation for all, not one per part
        for i in members:
            width = math.prod(parts[i].raw.shape[1:])
            out[i] = columns[start] if parts[i].raw.dim() == 1 else stats[:, start : start + width]
            start += width
    return [out[i] for i in range(len(parts))]


def moment_stats(
    x: torch.Tensor,
    per_channel: bool = False,
    samples: int = DEFAULT_SAMPLES,
    generator: torch.Generator | None = None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """The statistics of ``STATS`` for one activation tensor, as a ``[len(STATS)]`` tensor.

    With ``per_channel`` the result is ``[len(STATS), channels]``, channels on dim 1 (N, C, ...).
    ``workspace`` makes the temporaries reuse memory (same numbers, fewer page faults).
    """
    return finish(partial_moments(x, per_channel, samples, generator, workspace))


def histogram(x: torch.Tensor, bins: int, low: float, high: float) -> torch.Tensor:
    """Counts in ``bins`` equal bins over [low, high]; values outside are clamped into the end bins."""
    flat = x.detach().reshape(-1).float().clamp(low, high)
    return torch.histc(flat, bins=bins, min=low, max=high)
