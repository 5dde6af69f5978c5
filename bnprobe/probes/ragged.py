"""Rows of different lengths as one table: padded (the layout cached by the lengths), sorted, and
their quantiles, each row's to ``torch.quantile``'s bits. What lets the moment probes finish all
layers of a record step with a few operations instead of a few per layer."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import numpy as np
import torch

QUANTILES = (0.15, 0.50, 0.85)


@functools.lru_cache(maxsize=16)
def _padding_source(lengths: tuple[int, ...], width: int, device: torch.device) -> torch.Tensor:
    """For rows of ``lengths`` each padded to a multiple of ``width``: where each place takes its
    value from in the rows concatenated with one fill value after them."""
    total, starts = sum(lengths), itertools.accumulate(lengths, initial=0)
    return torch.cat([torch.cat([torch.arange(s, s + n), torch.full((-n % width,), total)]) for s, n in zip(starts, lengths)]).to(device)


def padded(rows: Sequence[torch.Tensor], width: int, fill: float, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``rows`` (1-D) each padded with ``fill`` to a multiple of ``width``, as ``[-1, width]``, by
    two operations whatever their count (the padding's places are cached by the rows' lengths);
    ``out``: 1-D memory for the rows joined (one more than their values) and for the result."""
    source = _padding_source(tuple(r.numel() for r in rows), width, rows[0].device)
    joined, table = out if out is not None else (None, None)
    everything = torch.cat([*rows, rows[0].new_full((1,), fill)], out=joined)
    return torch.index_select(everything, 0, source, out=table).view(-1, width)


def levels(sample: torch.Tensor) -> torch.Tensor:
    return torch.tensor(QUANTILES, dtype=sample.dtype).to(sample.device, non_blocking=True)


def quantiles(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[len(QUANTILES), len(rows)]``: ``torch.quantile`` of each row (1-D, of any lengths), to
    the bit but for a zero's sign (-0.0 and 0.0 tie, so either may come first): the same ranks,
    neighbours and interpolation on each row's own length, and NaN for a row with a NaN, as
    torch.quantile gives it. On CPU by selection (:func:`_selected_quantiles`), elsewhere by one
    sort (:func:`_sorted_quantiles`)."""
    if rows[0].device.type == "cpu" and rows[0].dtype in (torch.float32, torch.float64):
        return _selected_quantiles(rows)
    return _sorted_quantiles(rows)


def _ranks(rows: Sequence[torch.Tensor], wide: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[rows, len(QUANTILES)]``: where each quantile falls in its row's order, as torch.quantile
    computes it (levels in the rows' dtype, ranks in ``wide``)."""
    last = torch.tensor([r.numel() - 1 for r in rows], dtype=torch.float64).to(wide).to(device, non_blocking=True)
    return levels(rows[0]).to(device).to(wide)[None, :] * last[:, None]


def _sorted_quantiles(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`quantiles` from one sort of the rows padded with +inf, which sorts after every value
    but NaN (a row with a NaN takes its last place, the NaN)."""
    table = padded(rows, max(r.numel() for r in rows), float("inf")).sort(dim=1).values
    wide = table.dtype if table.device.type == "mps" else torch.float64  # ranks as wide as the device has
    ranks = _ranks(rows, wide, table.device).masked_fill_(table[:, -1:].isnan(), table.shape[1] - 1)
    below = ranks.long()
    weights = (ranks - below).to(table.dtype)
    return table.gather(1, below).lerp_(table.gather(1, ranks.ceil().long()), weights).t()


def _selected_quantiles(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`quantiles` of CPU rows by numpy's selection, rows of one length together: the three
    percentiles need three places of a row's order and their next values, not all of it. Each
    place is selected within the part of the row left between those already placed (the median
    first, then each half), and the value after a place is the least of the values between it and
    the next placed one. That is cheaper than numpy's sort (itself cheaper than torch's) on rows
    of thousands of values, the largest part of a record step on models of many layers."""
    dtype = np.float32 if rows[0].dtype == torch.float32 else np.float64
    ranks = _ranks(rows, torch.float64, rows[0].device)
    below, above = ranks.long(), ranks.ceil().long()
    lower, upper = np.empty(tuple(ranks.shape), dtype=dtype), np.empty(tuple(ranks.shape), dtype=dtype)
    has_nan = np.empty(len(rows), dtype=bool)
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_length.setdefault(row.numel(), []).append(i)
    for n, members in by_length.items():
        table = np.empty((len(members), n), dtype=dtype)
        for place, i in zip(table, members):
            place[:] = rows[i].numpy()
        floors = below[members[0]].tolist()
        placed = sorted(set(floors))
        _place(table, 0, n, placed)
        lower[members] = table[:, floors]
        for j, (k, k_next) in enumerate(zip(floors, above[members[0]].tolist())):
            bound = min((p for p in placed if p > k), default=n - 1)  # values in (k, bound] are the next ones in order
            upper[members, j] = table[:, k] if k_next == k else table[:, k + 1 : bound + 1].min(axis=1)
        has_nan[members] = np.isnan(table.max(axis=1))  # NaN propagates through max
    weights = (ranks - below).to(rows[0].dtype)
    out = torch.from_numpy(lower).lerp_(torch.from_numpy(upper), weights)
    return out.masked_fill_(torch.from_numpy(has_nan)[:, None], float("nan")).t()


def _place(table: np.ndarray, start: int, end: int, places: list[int]) -> None:
    """Partition ``table[:, start:end]`` (each row holding the values of its ranks start..end-1)
    so that each of ``places`` (sorted, within it) holds the value of that rank: the middle one
    over the whole part, then the others within the halves it leaves."""
    if not places:
        return
    middle = places[len(places) // 2]
    table[:, start:end].partition(middle - start, axis=1)
    _place(table, start, middle, [p for p in places if p < middle])
    _place(table, middle + 1, end, [p for p in places if p > middle])
