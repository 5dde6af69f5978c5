"""Every moment against an independent numpy reference on small tensors."""

import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bnprobe.probes import moments, ragged
from bnprobe.probes.moments import (
    STATS,
    Deferred,
    Partial,
    Summed,
    Workspace,
    deferred_or_partial,
    finish,
    finish_all,
    histogram,
    moment_stats,
    partial_moments,
    partials_together,
)


def numpy_stats(a: np.ndarray) -> dict[str, float]:
    a = a.astype(np.float64).ravel()
    mean = a.mean()
    var = ((a - mean) ** 2).mean()
    m3 = ((a - mean) ** 3).mean()
    m4 = ((a - mean) ** 4).mean()
    return {
        "mean": mean,
        "var": var,
        "skewness": m3 / var**1.5,
        "kurtosis": m4 / var**2 - 3,
        "min": a.min(),
        "max": a.max(),
        "zero_fraction": np.mean(a == 0),
        "p15": np.percentile(a, 15),
        "p50": np.percentile(a, 50),
        "p85": np.percentile(a, 85),
    }


@pytest.fixture
def relu_like() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 5, 5, generator=g).exp() - 1.2  # skewed
    return torch.relu(x)  # exact zeros


def test_whole_tensor_matches_numpy(relu_like: torch.Tensor) -> None:
    got = moment_stats(relu_like, samples=10**6)
    ref = numpy_stats(relu_like.numpy())
    assert got.shape == (len(STATS),)
    for i, name in enumerate(STATS):
        assert got[i].item() == pytest.approx(ref[name], rel=1e-4, abs=1e-5), name


def test_per_channel_matches_numpy(relu_like: torch.Tensor) -> None:
    got = moment_stats(relu_like, per_channel=True, samples=10**6)
    assert got.shape == (len(STATS), 4)
    for c in range(4):
        ref = numpy_stats(relu_like[:, c].numpy())
        for i, name in enumerate(STATS):
            assert got[i, c].item() == pytest.approx(ref[name], rel=1e-4, abs=1e-5), (name, c)


def test_percentiles_of_subsample_within_documented_tolerance() -> None:
    x = torch.randn(64, 32, 16, 16, generator=torch.Generator().manual_seed(0))  # 524k elements
    got = moment_stats(x, samples=16384, generator=torch.Generator().manual_seed(3))
    ref = numpy_stats(x.numpy())
    for name in ("p15", "p50", "p85"):
        # 3 standard errors of a quantile of N(0,1) from 16384 samples: 3*sqrt(p(1-p)/n)/pdf(q) < 0.04
        assert got[STATS.index(name)].item() == pytest.approx(ref[name], abs=0.04), name
    assert got[STATS.index("mean")].item() == pytest.approx(ref["mean"], abs=1e-5)  # moments use every element


def assert_float64_close(x: torch.Tensor, per_channel: bool, tolerances: dict[str, tuple[float, float]]) -> None:
    """The eager float32 statistics of ``x`` against those of ``x`` in float64, with (rtol, atol) per statistic."""
    got = moment_stats(x, per_channel, workspace=Workspace()).double()
    ref = moment_stats(x.double(), per_channel)
    for name, (rtol, atol) in tolerances.items():
        i = STATS.index(name)
        torch.testing.assert_close(got[i], ref[i], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("per_channel", [False, True])
def test_large_activations_keep_float32_accuracy(per_channel: bool) -> None:
    """4M elements off zero, like a conv layer's output at batch 128: float32 rounding only (one
    BLAS dot product over the whole tensor put the kurtosis 5e-3 off, the skewness up to 2e-3)."""
    g = torch.Generator().manual_seed(6)
    x = torch.relu(torch.randn(60, 4, 130, 128, generator=g) + 0.5) * 3 + 1  # no whole number of blocks
    assert_float64_close(x, per_channel, {"mean": (1e-6, 0.0), "var": (1e-6, 0.0), "skewness": (0.0, 1e-5), "kurtosis": (0.0, 1e-5)})


@pytest.mark.parametrize("per_channel", [False, True])
def test_data_far_from_zero_keeps_its_skewness(per_channel: bool) -> None:
    """Values at 10,000 +- 0.1: the mean rounded to float32 is off by up to 5e-4, which the
    centred sums must take out (centred on the rounded mean alone, the skewness came out 3e-3 off
    at +- 1, and the variance needs the square of that offset taken out too)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 4, 16, 16, generator=g).exp() * 0.05 + 10_000  # skewed
    assert_float64_close(x, per_channel, {"mean": (1e-7, 0.0), "var": (1e-6, 0.0), "skewness": (0.0, 1e-5), "kurtosis": (1e-6, 1e-5)})


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("size", [1e9, 1e15, 1e-20])
def test_any_finite_activation_has_finite_skewness_and_kurtosis(per_channel: bool, size: float) -> None:
    """Fourth powers of activations at 1e9 overflowed float32 (kurtosis inf, float64 says 0.19), and
    those at 1e-20 underflowed: the eager and the fused formulas agree with float64 at any size."""
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(11)).exp() * size  # skewed
    ref = moment_stats(x.double(), per_channel)
    flat = x.transpose(0, 1).reshape(3, -1) if per_channel else x.reshape(1, -1)
    fused = moments._fused_moments(flat, moments._mean(flat[:, ::7], torch.float64))  # what the compiled kernel computes, run eagerly
    for got in (moment_stats(x, per_channel), moment_stats(x, per_channel, workspace=Workspace()), fused if per_channel else fused[:, 0]):
        for name in ("skewness", "kurtosis"):
            i = STATS.index(name)
            torch.testing.assert_close(got[i].double(), ref[i], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [1.0, 1e15, 1e-15])
def test_fused_formulas_match_numpy_whatever_the_shift(dtype: torch.dtype, size: float) -> None:
    """The compiled kernel's formulas, run eagerly: every statistic of each row as numpy gives it,
    whether the shift is the row's mean, a subsample's, or three spreads away from it (what the
    formulas take out), in one pass for float32 and scaled for float64 values; and the mean of a
    row holding an infinity or NaN, whether or not the shift's sample held it."""
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(3, 2000, generator=g).exp() * size).to(dtype)
    x[1, ::5] = 0.0
    mean = x.double().mean(dim=1)
    unit = {"mean": size, "var": size * size, "min": size, "max": size}  # what a statistic is measured in
    for shift in (mean, moments._mean(x[:, ::9], torch.float64), mean + 3 * x.double().std(dim=1)):
        got = moments._fused_moments(x, shift)
        for row in range(3):
            want = numpy_stats(x[row].numpy())
            for i, name in enumerate(STATS[:7]):
                assert got[i, row].item() == pytest.approx(want[name], rel=1e-5, abs=1e-6 * unit.get(name, 1.0)), (name, row)
    inf, nan = float("inf"), float("nan")
    for held, mean_is in (([inf], inf), ([-inf], -inf), ([inf, -inf], nan), ([nan], nan)):  # whether or not the shift's sample saw them
        y = x.clone()
        y[0, : len(held)] = torch.tensor(held, dtype=dtype)
        for shift in (moments._mean(y[:, 1::9], torch.float64), moments._mean(y, torch.float64)):
            got = moments._fused_moments(y, shift)[STATS.index("mean"), 0]
            torch.testing.assert_close(got, torch.tensor(mean_is, dtype=dtype), equal_nan=True)
    if dtype == torch.float64:  # fourth powers beyond float64's range: the scale keeps skewness and kurtosis those of x
        huge = moments._fused_moments(x * 1e100, mean * 1e100)
        torch.testing.assert_close(huge[2:4], moments._fused_moments(x, mean)[2:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_rows_scale_is_the_many_rows_one(dtype: torch.dtype) -> None:
    """A single row's scale comes from Python's doubles, several rows' from tensor operations:
    the same power of two for spreads near 1, far above and below it, none, and NaN or infinite ones."""
    inf, nan = float("inf"), float("nan")
    cases = [(-1.0, 3.0, 0.5), (-1e9, 3e9, 1e8), (1e-30, 3e-30, 2e-30), (2.5, 2.5, 2.5), (-inf, 1.0, 0.0), (0.0, inf, inf)]
    cases += [(nan, nan, nan), (0.0, 1.0, nan), (-1e-44, 1e-44, 0.0), (-3e38, 3e38, 0.0)]
    for lo, hi, shift in cases:
        one = [torch.tensor([v], dtype=dtype) for v in (lo, hi, shift)]
        many = moments._scale(*(t.repeat(2) for t in one))
        assert torch.equal(moments._scale(*one), many[:1]), (lo, hi, shift)


def test_a_constant_channel_has_no_spread() -> None:
    """A dead ReLU's channel after a conv bias is one value that float32 cannot hold exactly as a
    sum: variance, skewness and kurtosis exactly 0 (rounding gave 2e-16, -1 and -2), mean the value."""
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(10))
    x[:, 1] = 0.1
    for workspace in (None, Workspace()):
        got = moment_stats(x, per_channel=True, workspace=workspace)[:, 1]
        assert got[STATS.index("mean")] == x[0, 1, 0, 0]
        assert [got[STATS.index(k)].item() for k in ("var", "skewness", "kurtosis")] == [0.0, 0.0, 0.0]
        assert partial_moments(x, True, workspace=workspace).raw[1:4, 1].tolist() == [0.0, 0.0, 0.0]  # as merged across processes


@pytest.mark.parametrize("shape", [(5, 3, 4), (2, 7), (40,), (9, 2, 3, 1)])
def test_blocks_of_any_size_give_the_whole_statistics(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...]) -> None:
    """The eager path sums in blocks of _CPU_BLOCK elements: blocks of 7 cut rows into pieces,
    group short rows, and leave remainders of both, and every statistic stays that of the whole,
    the extremes found block by block too, for values that need a scale (summed again) and not."""
    monkeypatch.setattr(moments, "_CPU_BLOCK", 7)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g)
    x[x < -0.5] = 0.0
    for per_channel, size in itertools.product((False, True), (1.0, 1e9)):
        y = x * size
        got = moment_stats(y, per_channel, 10**6, workspace=Workspace())
        ref = [numpy_stats(y[:, c].numpy()) for c in range(y.shape[1])] if per_channel and y.dim() > 1 else [numpy_stats(y.numpy())]
        for c, want in enumerate(ref):
            for i, name in enumerate(STATS):
                value = got[i, c] if got.dim() > 1 else got[i]
                assert value.item() == pytest.approx(want[name], rel=1e-5, abs=1e-6), (name, c, per_channel)


def test_finishing_layers_together_gives_each_ones_bits() -> None:
    """The Recorder finishes all layers at once (one quantile per subsample size): every layer's
    statistics must be what finishing it alone gives, bit for bit, whole or per channel, whatever
    the neighbours (other sample sizes, another dtype with the same size, an empty activation)."""
    g = torch.Generator().manual_seed(8)
    tensors = [torch.randn(16, 8, 6, 6, generator=g), torch.relu(torch.randn(4, 3, 5, generator=g)), torch.randn(32, 5, generator=g)]
    tensors += [torch.randn(16, 8, 6, 6, generator=g).double(), torch.randn(16, 8, 6, 6, generator=g) * 3, torch.empty(0, 3)]
    parts = [partial_moments(x, per_channel, 200, torch.Generator().manual_seed(1)) for x in tensors for per_channel in (False, True)]
    for k in range(40):  # rows of every width, so each value lands in vector and scalar lanes alike
        x = torch.randn(8, k % 9 + 1, 5, generator=g) * (k + 1) + k
        parts += [partial_moments(x, per_channel, 16, torch.Generator().manual_seed(k)) for per_channel in (False, True)]
    together = finish_all(parts)
    assert len({p.sample.shape[-1] for p in parts}) > 2  # several groups
    for part, stats in zip(parts, together, strict=True):
        alone = finish(part)
        assert stats.shape == alone.shape and stats.dtype == alone.dtype
        assert torch.equal(stats.nan_to_num(), alone.nan_to_num()) and torch.equal(stats.isnan(), alone.isnan())


def test_small_layers_reduced_together_give_each_ones_statistics() -> None:
    """Small layers wait and are reduced in one table: each one's statistics must be those it
    gets alone (to float32 rounding; its subsample the same values), whatever its neighbours:
    sizes that do and do not fill the table's rows, a constant, data far from zero, exact zeros,
    half and double precision, values whose fourth powers float32 cannot hold."""
    g = torch.Generator().manual_seed(9)
    tensors = [torch.randn(64, 10, generator=g) * 3 + 1, torch.relu(torch.randn(7, generator=g)), torch.full((300,), 2.5)]
    tensors += [
        torch.randn(2, 256, generator=g) * 1e-3 + 100,
        torch.randn(5, 3, generator=g).double(),
        torch.randn(40, 9, generator=g).half(),
    ]
    tensors += [torch.zeros(3, 3), torch.randn(1, generator=g), torch.relu(torch.randn(moments.SMALL, generator=g))]
    tensors += [torch.randn(300, generator=g).exp() * size for size in (1e9, 1e-20)]  # fourth powers over- and underflow float32
    items = [deferred_or_partial(x, 100, torch.Generator().manual_seed(i)) for i, x in enumerate(tensors)]
    waiting = [item for item in items if isinstance(item, Deferred)]
    assert len(waiting) == len(items)
    for i, (x, got) in enumerate(zip(tensors, partials_together(waiting))):
        alone = partial_moments(x, False, 100, torch.Generator().manual_seed(i))
        assert got.n == alone.n and got.raw.dtype == alone.raw.dtype and torch.equal(got.sample, alone.sample)
        torch.testing.assert_close(got.raw, alone.raw, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(finish(got), finish(alone), rtol=1e-5, atol=1e-6)
        assert torch.isfinite(finish(got)[:4]).all(), i
    assert partials_together(waiting[2:3])[0].raw[1:4].tolist() == [0.0, 0.0, 0.0]  # a constant has no spread
    workspace, fresh = Workspace(), partials_together(waiting)
    for reused in (partials_together(waiting, workspace), partials_together(waiting[::-1], workspace)[::-1]):  # its memory used twice
        assert all(torch.equal(a.raw, b.raw) for a, b in zip(fresh, reused))


def test_large_layers_sums_made_into_moments_together_give_each_ones_bits() -> None:
    """Large layers leave their sums, and the moments of all of them are made at once: each
    layer's must be the bits it gets alone, whatever its neighbours (another dtype, data far from
    zero, a constant, values whose fourth powers float32 cannot hold, exact zeros)."""
    g = torch.Generator().manual_seed(11)
    size = moments.SMALL + 7
    tensors = [torch.randn(size, generator=g) * 3 + 1, torch.relu(torch.randn(4, size, generator=g)), torch.full((size,), 2.5)]
    tensors += [torch.randn(size, generator=g) * 1e-3 + 100, torch.randn(size, generator=g).double(), torch.randn(size, generator=g).half()]
    tensors += [torch.randn(size, generator=g).exp() * scale for scale in (1e9, 1e-20)]
    items = [deferred_or_partial(x, 100, torch.Generator().manual_seed(i), Workspace()) for i, x in enumerate(tensors)]
    summed = [item for item in items if isinstance(item, Summed)]
    assert len(summed) == len(items)
    for i, (x, got) in enumerate(zip(tensors, partials_together(summed))):
        alone = partial_moments(x, False, 100, torch.Generator().manual_seed(i))
        assert got.n == alone.n and torch.equal(got.sample, alone.sample)
        assert torch.equal(got.raw, alone.raw), i


def test_a_large_or_empty_layer_gets_its_statistics_at_once() -> None:
    for x in (torch.randn(moments.SMALL + 1), torch.empty(0, 4)):
        assert not isinstance(deferred_or_partial(x, 100, None), Deferred)
    assert isinstance(deferred_or_partial(torch.empty(0, 4), 100, None), Partial)
    compiled = Workspace(compiled=True)
    compiled.compiled = True
    compiled._kernel = moments._fused_moments  # the compiled kernel's formulas, without compiling them
    assert isinstance(deferred_or_partial(torch.randn(moments.SMALL + 1), 100, None, compiled), Partial)


def test_quantiles_together_are_torch_quantiles_bits() -> None:
    """Rows of several lengths together, by selection and by one sort of them padded: torch.quantile
    of each row, to the bit, with infinities, ties and NaN in them, and rows that are strided views
    (a per-channel subsample's)."""
    g = torch.Generator().manual_seed(10)
    rows = [torch.randn(k % 23 + 1, generator=g) * (k + 1) + k for k in range(40)]
    rows += [
        *torch.randn(6, 4, generator=g).t(),
        torch.tensor([1.0, float("inf"), -float("inf"), 2.0]),
        torch.tensor([1.0, float("nan"), 3.0]),
        torch.randn(500, generator=g).double(),
    ]
    rows[-1:-1] = [torch.randint(0, 3, (50,), generator=g).float() for _ in range(4)]  # ties, several rows of one length
    rows[-1:-1] = [torch.tensor([float("nan"), 1.0, 2.0, 0.5] * 20), torch.randn(16384, generator=g), torch.randn(16384, generator=g)]
    rows[-1:-1] = [
        torch.tensor([0.0, 1.0, float("inf")]),
        torch.tensor([-float("inf"), 0.0, 1.0, 2.0, float("inf")]),
    ]  # a rank on the value
    for group in (rows[:-1], rows[-1:]):
        want = torch.stack([torch.quantile(r, torch.tensor(ragged.QUANTILES, dtype=r.dtype)) for r in group], dim=1)
        for got in (ragged.quantiles(group), ragged._sorted_quantiles(group)):  # selection on CPU; the sort elsewhere
            assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())


def _long_rows(dtype: torch.dtype, n: int = 3000) -> torch.Tensor:
    """Rows long enough for the radix pass, of data a layer gives and data that is hard for it."""
    g = torch.Generator().manual_seed(11)
    rows = [
        torch.randn(n, generator=g, dtype=dtype),
        torch.rand(n, generator=g, dtype=dtype) * 100 - 30,
        torch.randn(n, generator=g, dtype=dtype) * 1e-3 + 5,  # every value in one or two top digits
        torch.randn(n, generator=g, dtype=dtype).exp() * 1e20,
        torch.relu(torch.randn(n, generator=g, dtype=dtype)),  # half exact zeros
        torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0).to(dtype)
        + torch.randn(n, generator=g, dtype=dtype) * (torch.arange(n) % 3 == 0),
        torch.randint(-2, 3, (n,), generator=g).to(dtype),  # ties everywhere
        torch.cat(
            [torch.full((n // 3,), -float("inf")), torch.randn(n - 2 * (n // 3), generator=g), torch.full((n // 3,), float("inf"))]
        ).to(dtype),
        torch.randn(n, generator=g, dtype=dtype) * torch.finfo(dtype).tiny,  # subnormal
    ]
    return torch.stack(rows)


SPREAD = [0, 1, 3, 8]  # the rows of _long_rows whose values do not crowd the percentiles' digits


def _counting_tables(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """The row count of each table that ragged's ``name`` (``_partitioned_ranks`` or
    ``_radix_ranks``) is given from now on."""
    tables: list[int] = []
    ranks_of = getattr(ragged, name)

    def counted(table: np.ndarray, placed: list[int], wanted: list[int]) -> np.ndarray:
        tables.append(len(table))
        return ranks_of(table, placed, wanted)

    monkeypatch.setattr(ragged, name, counted)
    return tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_ranks_are_a_sorts_values(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank's value as numpy's sort gives it (a zero's sign aside), the first and last ranks
    too: rows of spread values together and alone by the radix pass, and among them rows that
    crowd the ranks' digits, which are partitioned instead (and no others), alone as in a group."""
    table = _long_rows(dtype).numpy()
    n = table.shape[1]
    ranks = [0, 1, 449, 450, 1499, 1500, 2548, 2549, n - 1]
    placed = ranks[::2]  # each other rank is one after a placed one
    partitioned = _counting_tables(monkeypatch, "_partitioned_ranks")
    alone = [(table[i : i + 1], []) for i in SPREAD]
    for rows, crowded in [(table, [len(table) - len(SPREAD)]), (table[SPREAD], []), *alone, (table[2:3], [1])]:
        partitioned.clear()
        got = ragged._radix_ranks(rows.copy(), placed, ranks)
        assert got.dtype == table.dtype
        np.testing.assert_array_equal(got, np.sort(rows, axis=1)[:, ranks])
        assert partitioned == crowded
    partitioned.clear()
    np.testing.assert_array_equal(
        ragged._radix_ranks(np.full((3, n), 2.5, dtype=table.dtype), placed, ranks), np.full((3, len(ranks)), 2.5)
    )
    assert partitioned == [3]


def test_quantiles_of_long_rows_are_torch_quantiles_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The percentiles of groups of rows that take the radix pass, with a NaN in a spread row, and
    of the first row alone: torch.quantile's bits. Alone, a float64 row of 16400 values takes the
    radix pass; a float32 row of 4100 is partitioned, too few values for the pass to pay."""
    took = _counting_tables(monkeypatch, "_radix_ranks")
    for dtype, n in ((torch.float32, 4100), (torch.float64, 16400)):  # rows at least half the count of digits
        rows = list(_long_rows(dtype, n))
        rows[1] = rows[1].clone()
        rows[1][7] = float("nan")
        took.clear()
        for group in (rows, [rows[i] for i in SPREAD], rows[:1]):
            want = torch.stack([torch.quantile(r, torch.tensor(ragged.QUANTILES, dtype=r.dtype)) for r in group], dim=1)
            got = ragged.quantiles(group)
            assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())
        alone = [1] if n >= ragged._RADIX_VALUES else []  # a row alone takes the radix pass where it holds enough values
        assert took == [len(rows), len(SPREAD), *alone]


def test_constant_tensor_has_zero_skew_and_kurtosis() -> None:
    got = moment_stats(torch.full((4, 3), 2.0))
    assert got[STATS.index("var")] == 0
    assert got[STATS.index("skewness")] == 0 and got[STATS.index("kurtosis")] == 0


def test_half_precision_is_computed_in_float32() -> None:
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    got = moment_stats(x.half(), samples=10**6)
    assert got.dtype == torch.float32
    ref = numpy_stats(x.half().float().numpy())
    assert got[1].item() == pytest.approx(ref["var"], rel=1e-4)


def test_histogram_counts_match_numpy() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    got = histogram(x, bins=8, low=-4.0, high=4.0)
    ref, _ = np.histogram(np.clip(x.numpy(), -4, 4), bins=8, range=(-4, 4))
    np.testing.assert_array_equal(got.numpy(), ref)


@pytest.mark.parametrize("per_channel", [False, True])
def test_signed_values_with_exact_zeros(per_channel: bool) -> None:
    """Negative values are not zeros: zero_fraction counts exact zeros only (mixed signs, not a ReLU output)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 3, 7, generator=g)
    x[torch.rand(x.shape, generator=g) < 0.2] = 0.0
    x[0, 1] = -0.0  # negative zero is a zero too
    got = moment_stats(x, per_channel=per_channel, samples=10**6)
    chunks = [x[:, c].numpy() for c in range(3)] if per_channel else [x.numpy()]
    for c, chunk in enumerate(chunks):
        ref = numpy_stats(chunk)
        assert 0.1 < ref["zero_fraction"] < 0.5 and chunk.min() < 0
        for i, name in enumerate(STATS):
            value = got[i, c] if per_channel else got[i]
            assert value.item() == pytest.approx(ref[name], rel=1e-4, abs=1e-5), (name, c)


@pytest.mark.parametrize("block", [7, 1 << 18])
def test_zero_fraction_counts_exact_zeros_only(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    """Zeros are counted as float ones: those equal to 0 (-0.0 too, NaN not), exactly, in blocks of
    any size, and in the small layers' table."""
    monkeypatch.setattr(moments, "_CPU_BLOCK", block)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, 9, generator=g)
    x[x.abs() < 0.4] = 0.0
    x[0, 0, 0] = -0.0
    x[1, 2, :2] = float("nan")
    zero = STATS.index("zero_fraction")
    want = (x == 0).double().mean().float()
    per_channel = (x == 0).transpose(0, 1).reshape(4, -1).double().mean(1).float()
    assert torch.equal(moment_stats(x, samples=10, workspace=Workspace())[zero], want)
    assert torch.equal(moment_stats(x, True, 10, workspace=Workspace())[zero], per_channel)
    (together,) = partials_together([Deferred(x.reshape(-1).clone(), x.reshape(-1)[:10].clone())])
    assert torch.equal(together.raw[6], want)


def test_training_records_the_steps_it_took(in_tmp: Path) -> None:
    """bnprobe train's numbers against the same training written out by hand: per step the batch
    loss, accuracy and lr, and every probes.moments.every steps the moments of each layer's output."""
    from torch import nn

    from bnprobe.config import load_config
    from bnprobe.data import batches, load_data
    from bnprobe.experiment import run_experiment
    from bnprobe.models import build_model
    from bnprobe.store import read_file

    overrides = {
        "model": "mlp",
        "data": "synthetic:mnist",
        "data_options": {"n": 64},
        "steps": 5,
        "batch_size": 16,
        "lr": 0.1,
        "momentum": 0.9,
        "probes.moments.every": 2,
        "output": "r.h5",
    }
    cfg = load_config(None, overrides)
    run_experiment(cfg)
    run = read_file("r.h5").runs["keep"]

    bundle = load_data("synthetic:mnist", seed=cfg.seed, n=64)
    torch.manual_seed(cfg.seed)
    model = build_model("mlp", bundle.num_outputs, bundle.input_shape)
    modules = dict(model.named_modules())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outputs: dict[str, torch.Tensor] = {}
    for name in run.layer_names:
        modules[name].register_forward_hook(
            lambda m, i, o, name=name: None if name in outputs else outputs.update({name: o.detach().clone()})
        )
    losses, accs, moments = [], [], []
    for step, (x, y) in zip(range(5), batches(bundle, 16, seed=cfg.seed)):
        outputs.clear()
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        losses.append(loss.item())
        accs.append((out.argmax(dim=1) == y).float().mean().item())
        if step % 2 == 0:
            moments.append(torch.stack([moment_stats(outputs[n]) for n in run.layer_names], dim=1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert run.layer_names == ["1", "3", "5", "7"]  # the four Linear layers, in forward order
    assert run.data["train/step"].tolist() == [0, 1, 2, 3, 4]
    assert run.data["train/loss"].tolist() == pytest.approx(losses, rel=1e-6)
    assert run.data["train/accuracy"].tolist() == pytest.approx(accs, abs=1e-7)
    assert run.data["train/lr"].tolist() == [0.1] * 5
    assert len(set(losses)) == 5 and len(set(accs)) > 1  # the loop trains: every number differs
    assert run.data["moments/step"].tolist() == [0, 2, 4]
    for i, stat in enumerate(STATS):  # 16 x 100 elements: below the percentile subsample, so exact
        got = np.asarray(run.data[f"moments/{stat}"], dtype=np.float64)
        want = torch.stack([m[i] for m in moments]).double().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=stat)


def test_a_reused_workspace_gives_the_same_bits() -> None:
    """The Recorder passes one Workspace to every call: the statistics must equal those computed
    with fresh temporaries to the bit, whatever shapes came before (larger, smaller, strided)."""
    g = torch.Generator().manual_seed(2)
    shapes = [(16, 8, 6, 6), (4, 3), (16, 8, 6, 6), (32, 5), (2, 3, 4, 5), (64,)]
    tensors = [torch.relu(torch.randn(s, generator=g)) for s in shapes] + [torch.randn(8, 6, generator=g).t()]  # a strided one
    workspace = Workspace()
    for x in tensors:
        for per_channel in (False, True):
            fresh = moment_stats(x, per_channel, 50, torch.Generator().manual_seed(0))
            reused = moment_stats(x, per_channel, 50, torch.Generator().manual_seed(0), workspace)
            assert torch.equal(fresh.nan_to_num(), reused.nan_to_num()), (tuple(x.shape), per_channel)
    first = workspace.take(0, (10, 10), torch.float32, torch.device("cpu"))
    assert workspace.take(0, (5, 3), torch.float32, torch.device("cpu")).data_ptr() == first.data_ptr()  # memory is reused


def test_compiled_moments_fall_back_to_the_eager_bits_when_compiling_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(fn: object, **_: object) -> object:
        def fails(*_a: object) -> None:
            raise RuntimeError("no C++ compiler")

        return fails

    monkeypatch.setattr(torch, "compile", no_compiler)
    x = torch.relu(torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(4)))
    workspace = Workspace(compiled=True)
    with pytest.warns(UserWarning, match=r"compiled moments unavailable \(RuntimeError\); computing them eagerly"):
        first = moment_stats(x, workspace=workspace)
    assert not workspace.compiled  # warned once, eager from now on
    assert torch.equal(first, moment_stats(x)) and torch.equal(moment_stats(x, workspace=workspace), moment_stats(x))


@pytest.mark.slow
def test_compiled_moments_equal_the_eager_ones() -> None:
    """One compile (about 20 s on 2 cores), then whole-tensor and per-channel statistics of several
    shapes, as the eager path gives them up to float32 rounding (the numpy tests use the same tolerance)."""
    g = torch.Generator().manual_seed(5)
    workspace = Workspace(compiled=True)
    probe = torch.ones(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moment_stats(probe, workspace=workspace)
    if not workspace.compiled:
        pytest.skip("torch.compile cannot build kernels here (no C++ compiler?); the fallback is tested above")
    for shape in [(16, 8, 6, 6), (4, 3, 7, 7), (64, 10)]:
        x = torch.relu(torch.randn(shape, generator=g) + 0.3)
        for per_channel in (False, True):
            eager = moment_stats(x, per_channel, 10**6)
            fused = moment_stats(x, per_channel, 10**6, workspace=workspace)
            torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)  # kurtosis amplifies rounding
    large = torch.relu(torch.randn(64, 4, 128, 128, generator=g) + 0.5) * 3 + 1  # the compiled sums are float64's
    for per_channel in (False, True):
        fused, exact = moment_stats(large, per_channel, workspace=workspace).double(), moment_stats(large.double(), per_channel)
        torch.testing.assert_close(fused[:4], exact[:4], rtol=1e-6, atol=1e-6)
    assert workspace.compiled  # no fallback happened
