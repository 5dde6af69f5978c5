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
    """:func:`quantiles` of CPU rows by selection, rows of one length together: the three
    percentiles need a few places of a row's order, not all of it. Groups of long rows take
    :func:`_radix_ranks` (where :func:`_radix_pays`), whose crowded rows and every other group are
    partitioned by numpy (:func:`_partitioned_ranks`). Both are cheaper than numpy's sort (itself
    cheaper than torch's) on rows of thousands of values, the largest part of a record step on
    models of many layers."""
    dtype = np.float32 if rows[0].dtype == torch.float32 else np.float64
    ranks = _ranks(rows, torch.float64, rows[0].device)
    below, above = ranks.long(), ranks.ceil().long()
    lower, upper = np.empty(tuple(ranks.shape), dtype=dtype), np.empty(tuple(ranks.shape), dtype=dtype)
    has_nan = np.empty(len(rows), dtype=bool)
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_length.setdefault(row.numel(), []).append(i)
    for members in by_length.values():
        table = torch.stack([rows[i] for i in members]).numpy()  # a copy: the selection reorders it
        has_nan[members] = np.isnan(table.max(axis=1))  # NaN propagates through max
        floors, nexts = below[members[0]].tolist(), above[members[0]].tolist()
        wanted = sorted(set(floors + nexts))
        values = _radix_ranks(table, floors, wanted) if _radix_pays(table) else _partitioned_ranks(table, floors, wanted)
        lower[members] = values[:, [wanted.index(k) for k in floors]]
        upper[members] = values[:, [wanted.index(k) for k in nexts]]
    weights = (ranks - below).to(rows[0].dtype)
    out = torch.from_numpy(lower).lerp_(torch.from_numpy(upper), weights)
    return out.masked_fill_(torch.from_numpy(has_nan)[:, None], float("nan")).t()


def _partitioned_ranks(table: np.ndarray, placed: list[int], wanted: list[int]) -> np.ndarray:
    """``[rows, len(wanted)]``: the values of ``wanted`` (sorted) in each row's order, by numpy's
    partition of ``table`` in place. The ``placed`` ranks are partitioned into their places
    (:func:`_place`); each other wanted rank is one after a placed one, and its value the least
    of those between that place and the next."""
    n = table.shape[1]
    placed = sorted(set(placed))
    _place(table, 0, n, placed)
    columns = []
    for k in wanted:
        if k in placed:
            columns.append(table[:, k])
        else:
            bound = min((p for p in placed if p >= k), default=n - 1)  # values of ranks k..bound are those after rank k - 1
            columns.append(table[:, k : bound + 1].min(axis=1))
    return np.stack(columns, axis=1)


_RADIX_VALUES = 1 << 14  # values of a group of rows below which its partition costs less than a radix pass's fixed cost
_DIGIT_BITS = {4: 12, 8: 15}  # by bytes per value, a radix pass's digit: the sign, the exponent and 3 bits of the mantissa


def _radix_pays(table: np.ndarray) -> bool:
    """Whether :func:`_radix_ranks` beats a partition on ``table``: enough values in all, rows at
    least half as long as the count of digits made for each, and digits that fit an int32."""
    rows, n = table.shape
    bits = _DIGIT_BITS[table.itemsize]
    return table.size >= _RADIX_VALUES and n >= 1 << (bits - 1) and rows << bits < 1 << 31


def _radix_ranks(table: np.ndarray, placed: list[int], ranks: list[int]) -> np.ndarray:
    """``[rows, len(ranks)]``: the values of ``ranks`` (sorted) in each row's order by one radix
    pass; rows whose values crowd the ranks' digits are partitioned instead (``placed`` as in
    :func:`_partitioned_ranks`).

    Each value's bits are made an integer key that sorts as the value does (negative values'
    magnitude bits flipped); one count of every row's keys by their top bits (``_DIGIT_BITS``) tells
    the digit holding each rank and how many keys come before it; only the keys of those digits
    are sorted. Overwrites ``table`` with the keys. NaN, a rank on a tie, a zero's sign: as a sort
    of the keys orders them (-0.0 before 0.0; callers mark rows holding a NaN themselves)."""
    rows, n = table.shape
    ints = np.int32 if table.dtype == np.float32 else np.int64
    width, bits = 8 * table.itemsize, _DIGIT_BITS[table.itemsize]
    shift, magnitude = ints(width - bits), ints(np.iinfo(ints).max)
    keys = table.view(ints)
    flip = keys >> ints(width - 1)  # -1 at negative values, 0 elsewhere
    flip &= magnitude
    keys ^= flip  # keys now sort as the values do; xor again undoes it
    digits = np.right_shift(keys, shift, out=flip)
    digits += ((np.arange(rows, dtype=ints) << ints(bits)) + ints(1 << (bits - 1)))[:, None]  # row g's digits count from g * 2^bits
    counts = torch.bincount(torch.from_numpy(digits.reshape(-1)), minlength=rows << bits).numpy()
    ends = counts.cumsum()  # all rows' digits in turn: row g's keys end at (g + 1) * n
    wanted = np.arange(rows)[:, None] * n + np.asarray(ranks)[None, :]
    chosen = np.searchsorted(ends, wanted, side="right")  # [rows, ranks]: the digit (over all rows) holding each rank
    inside = wanted - (ends[chosen] - counts[chosen])  # each rank's place among its digit's keys
    fresh = np.ones(chosen.shape, dtype=bool)
    fresh[:, 1:] = chosen[:, 1:] != chosen[:, :-1]
    kept = np.zeros(table.shape, dtype=bool)
    for column in np.flatnonzero(fresh.any(axis=0)):
        kept |= digits == chosen[:, column, None]
    per_row = np.count_nonzero(kept, axis=1)
    out = np.empty((rows, len(ranks)), dtype=table.dtype)
    crowded = per_row * 4 > n  # sorting more than a quarter of a row costs more than partitioning it
    if crowded.any():
        kept[crowded] = False
        out[crowded] = _partitioned_ranks(_flipped_back(keys[crowded]).view(table.dtype), placed, ranks)
        if crowded.all():
            return out
    spread = np.flatnonzero(~crowded)
    taken = per_row[spread]
    picked = keys[kept]  # row by row, each spread row's digits in its order
    sorted_keys = np.full((len(spread), int(taken.max())), magnitude, dtype=ints)
    starts = np.repeat(np.cumsum(taken) - taken, taken)
    sorted_keys[np.repeat(np.arange(len(spread)), taken), np.arange(picked.size) - starts] = picked
    sorted_keys.sort(axis=1)
    first = np.cumsum(np.where(fresh, counts[chosen], 0), axis=1) - counts[chosen]  # keys of the row's earlier chosen digits
    found = np.take_along_axis(sorted_keys, (first + inside)[spread], axis=1)
    out[spread] = _flipped_back(found).view(table.dtype)
    return out


def _flipped_back(keys: np.ndarray) -> np.ndarray:
    """``keys`` (a copy it may overwrite) as the float bits they were made from: negative keys'
    magnitude bits flipped again, as :func:`_radix_ranks` flipped them."""
    keys ^= (keys >> keys.dtype.type(8 * keys.itemsize - 1)) & np.iinfo(keys.dtype).max
    return keys


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
