"""Every moment against an independent numpy reference on small tensors."""

import numpy as np
import pytest
import torch

from bnprobe.probes.moments import STATS, histogram, moment_stats


def numpy_stats(a: np.ndarray) -> dict[str, float]:
    a = a.astype(np.float64).ravel()
    mean = a.mean()
    var = ((a - mean) ** 2).mean()
    m3 = ((a - mean) ** 3).mean()
    m4 = ((a - mean) ** 4).mean()
    return {
        "mean": mean, "var": var, "skewness": m3 / var**1.5, "kurtosis": m4 / var**2 - 3, "min": a.min(), "max": a.max(),
        "zero_fraction": np.mean(a == 0), "p15": np.percentile(a, 15), "p50": np.percentile(a, 50), "p85": np.percentile(a, 85),
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
