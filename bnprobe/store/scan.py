"""Record datasets a slice of records at a time: what a report, plot or health check reduces over
a run's records (a sparkline's bins, the least and greatest value, the first record where something
holds) is read in memory bounded by a slice, however many records a long run holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .reader import RunData

#: numbers read at a time (2 MiB as float64), whatever the length of the run
SLICE_NUMBERS = 1 << 18


def record_count(run: RunData, section: str, quantity: str) -> int:
    """How many records ``<section>/<quantity>`` holds (0 when not recorded); nothing is read."""
    path = f"{section}/{quantity}"
    return run.data.shape(path)[0] if path in run.data else 0


def record_at(run: RunData, section: str, quantity: str, index: int) -> np.ndarray:
    """Record ``index`` of ``<section>/<quantity>``, only it read."""
    return np.asarray(run.data.read(f"{section}/{quantity}", slice(index, index + 1))[0])


def record_slices(run: RunData, section: str, quantity: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Records ``[start, stop)`` of ``<section>/<quantity>`` in consecutive slices (see
    :func:`aligned_slices`), each with the index of its first record."""
    for first, (block,) in aligned_slices(run, section, (quantity,), start, stop):
        yield first, block


def aligned_slices(
    run: RunData, section: str, quantities: Sequence[str], start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, list[np.ndarray]]]:
    """Records ``[start, stop)`` of datasets of one section, cut at the same records into slices
    of about :data:`SLICE_NUMBERS` numbers in all (one record at least), each with the index of its
    first record; none is kept, so a reduction over them holds one slice."""
    paths = [f"{section}/{q}" for q in quantities]
    shapes = [run.data.shape(p) for p in paths]
    stop = min(shape[0] for shape in shapes) if stop is None else min(stop, *(shape[0] for shape in shapes))
    per = max(1, SLICE_NUMBERS // max(1, sum(math.prod(shape[1:]) for shape in shapes)))
    for first in range(start, stop, per):
        yield first, [run.data.read(p, slice(first, min(first + per, stop))) for p in paths]


@dataclass(frozen=True)
class Binned:
    """A record dataset's columns reduced over its records: ``means[b]`` is the mean of bin ``b``,
    a run of consecutive records from record ``starts[b]`` (the records cut evenly into bins as
    ``np.array_split`` cuts them; a record per bin when there are no more records than bins), and
    ``low``/``high`` the least and greatest value of each column. Non-finite values are left out;
    where none is left, NaN."""

    means: np.ndarray  # [bin, column]
    starts: np.ndarray  # [bin]
    low: np.ndarray  # [column]
    high: np.ndarray  # [column]

    @classmethod
    def unrecorded(cls, bins: int, stop: int, width: int) -> Binned:
        """The bins of ``stop`` records of ``width`` columns none of which was recorded: NaN throughout."""
        sizes, nothing = bin_sizes(bins, stop), np.full(width, np.nan)
        return cls(np.full((len(sizes), width), np.nan), np.cumsum(sizes) - sizes, nothing, nothing)


def bin_sizes(bins: int, stop: int) -> np.ndarray:
    """Records per bin, ``stop`` records cut evenly into at most ``bins`` bins (as ``np.array_split`` cuts)."""
    count = min(bins, stop)
    sizes = np.full(count, stop // count, dtype=np.int64)
    sizes[: stop % count] += 1
    return sizes


def binned(
    run: RunData, section: str, quantity: str, bins: int, stop: int, transform: Callable[[np.ndarray], np.ndarray] | None = None
) -> Binned:
    """Records ``[0, stop)`` of ``<section>/<quantity>`` (as float64, through ``transform`` if
    given; ``stop`` at least 1) reduced to at most ``bins`` bins, a slice at a time (see :class:`Binned`)."""
    sizes = bin_sizes(bins, stop)
    count = len(sizes)
    bin_of = np.repeat(np.arange(count), sizes)
    width = math.prod(run.data.shape(f"{section}/{quantity}")[1:])
    sums, counts = np.zeros((count, width)), np.zeros((count, width), dtype=np.int64)
    low, high = np.full(width, np.inf), np.full(width, -np.inf)
    for first, block in record_slices(run, section, quantity, 0, stop):
        values = np.asarray(block, dtype=np.float64).reshape(len(block), width)
        if transform is not None:
            with np.errstate(invalid="ignore"):
                values = transform(values)
        finite = np.isfinite(values)
        at = bin_of[first : first + len(block)]
        cuts = np.flatnonzero(np.r_[True, at[1:] != at[:-1]])  # where a bin begins in this slice
        sums[at[cuts]] += np.add.reduceat(np.where(finite, values, 0.0), cuts, axis=0)
        counts[at[cuts]] += np.add.reduceat(finite.astype(np.int64), cuts, axis=0)
        low = np.minimum(low, np.where(finite, values, np.inf).min(axis=0))
        high = np.maximum(high, np.where(finite, values, -np.inf).max(axis=0))
    none = counts.sum(axis=0) == 0
    low[none], high[none] = np.nan, np.nan
    with np.errstate(invalid="ignore"):
        return Binned(sums / counts, np.cumsum(sizes) - sizes, low, high)


def _finite_median(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else np.nan


def column_medians(run: RunData, section: str, quantity: str) -> np.ndarray:
    """The median of each column of the 2-D ``<section>/<quantity>`` over its records, of the
    finite values (NaN where there is none). A median needs every record of its column: the
    columns are read a few at a time, about :data:`SLICE_NUMBERS` numbers."""
    path = f"{section}/{quantity}"
    records, width = run.data.shape(path)
    per = max(1, SLICE_NUMBERS // max(1, records))
    medians = np.full(width, np.nan)
    for first in range(0, width, per):
        block = np.asarray(run.data.read(path, (slice(None), slice(first, first + per))), dtype=np.float64)
        medians[first : first + block.shape[1]] = [_finite_median(column) for column in block.T]
    return medians


def record_ranges(run: RunData, section: str, quantity: str) -> np.ndarray:
    """Of each record of ``<section>/<quantity>``, its greatest minus its least finite value (NaN
    where there is none), a slice of records at a time."""
    ranges = []
    for _, block in record_slices(run, section, quantity):
        values = np.asarray(block, dtype=np.float64).reshape(len(block), -1)
        finite = np.isfinite(values)
        spread = np.where(finite, values, -np.inf).max(axis=1) - np.where(finite, values, np.inf).min(axis=1)
        ranges.append(np.where(finite.any(axis=1), spread, np.nan))
    return np.concatenate(ranges) if ranges else np.zeros(0)


def extremes(run: RunData, section: str, quantity: str) -> tuple[float, float]:
    """The least and greatest finite value of ``<section>/<quantity>`` (NaN when there is none),
    a slice of records at a time."""
    records = record_count(run, section, quantity)
    if records == 0:
        return math.nan, math.nan
    found = binned(run, section, quantity, 1, records)
    return float(np.fmin.reduce(found.low)), float(np.fmax.reduce(found.high))
