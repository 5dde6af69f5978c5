"""Hessian spectrum (Lanczos top-k, Hutchinson trace, SLQ density) against the full Hessian and eigvalsh."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_hessian import data, full_hessian, full_hessian_of, tiny
from torch import nn
from typer.testing import CliRunner

from bnprobe.config import load_config
from bnprobe.errors import ConfigError
from bnprobe.probes.hessian import first_order, hvp_function, start_vector
from bnprobe.probes.lanczos import _orthogonalised, top_converged, top_k
from bnprobe.probes.spectrum import (
    block_spectra,
    hessian_trace,
    lanczos,
    lanczos_start,
    rademacher,
    spectral_density,
    top_eigenvalues,
)
from bnprobe.quadrature import density

LOSS = nn.CrossEntropyLoss()


def bn_model(mode: str) -> tuple[nn.Module, nn.Module]:
    """The tiny BN MLP (float64) with moved running statistics, and the reference whose plain
    forward is the function the Hessian is taken of in ``mode`` (a copy in eval mode for ``eval``)."""
    model = tiny()
    x, _ = data()
    model(x * 1.5 + 0.3)  # running statistics away from (0, 1)
    return model, (copy.deepcopy(model).eval() if mode == "eval" else model)


def off_diagonal_squares(h: torch.Tensor) -> float:
    return float(h.square().sum() - h.diagonal().square().sum())


# ----------------------------------------------------------------------------- Lanczos itself


def test_lanczos_on_a_matrix_gives_its_eigenvalues_and_quadrature() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    a = a + a.T
    q = torch.randn(12, generator=g, dtype=torch.float64)
    r = lanczos(lambda v: a @ v, 12, 12, q)
    assert r.steps == 12
    torch.testing.assert_close(r.values, torch.linalg.eigvalsh(a), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(r.basis @ r.basis.T, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)
    q1 = q / q.norm()
    for j in range(4):  # Gauss quadrature: sum w theta^j = q1' A^j q1
        assert float((r.weights * r.values**j).sum()) == pytest.approx(float(q1 @ torch.linalg.matrix_power(a, j) @ q1), rel=1e-9)
    short = lanczos(lambda v: a @ v, 12, 5, q)  # exact up to degree 2*5-1
    moment = float(q1 @ torch.linalg.matrix_power(a, 9) @ q1)
    assert short.steps == 5 and float((short.weights * short.values**9).sum()) == pytest.approx(moment, rel=1e-8)
    residual = a @ short.ritz_vectors(1)[0] - short.values[-1] * short.ritz_vectors(1)[0]
    assert float(residual.norm()) == pytest.approx(float(short.residuals[-1]), rel=1e-6)


def test_lanczos_breakdown_restarts_or_stops() -> None:
    """A start vector in a 2-D invariant subspace: exact after 2 steps; with restart it goes on to the rest."""
    a = torch.diag(torch.tensor([5.0, 5.0, 3.0, 1.0, 1.0, -2.0], dtype=torch.float64))
    start = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    stopped = lanczos(lambda v: a @ v, 6, 6, start, restart=False)
    assert stopped.steps == 2 and stopped.values.tolist() == pytest.approx([3.0, 5.0])
    assert float(stopped.weights.sum()) == pytest.approx(1.0)
    went_on = lanczos(lambda v: a @ v, 6, 6, start)
    assert went_on.steps == 6 and went_on.values.tolist() == pytest.approx([-2.0, 1.0, 1.0, 3.0, 5.0, 5.0])


def test_a_second_reorthogonalisation_pass_only_where_the_first_cancels() -> None:
    """w almost in the basis's span: one Gram-Schmidt pass leaves what remains visibly non-orthogonal,
    the second repairs it; where little cancels the one pass is all that is done."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(50, 5, generator=g, dtype=torch.float64)).Q.T
    w = 1e3 * (basis.T @ torch.randn(5, generator=g, dtype=torch.float64)) + 1e-9 * torch.randn(50, generator=g, dtype=torch.float64)
    one_pass = w - basis.T @ (basis @ w)
    assert float((basis @ one_pass).abs().max()) > 1e-8 * float(one_pass.norm())  # the case the second pass is for
    out, norm = _orthogonalised(w, basis)
    assert norm == float(out.norm()) and float((basis @ out).abs().max()) <= 1e-14 * norm
    w = torch.randn(50, generator=g, dtype=torch.float64)
    out, norm = _orthogonalised(w, basis)
    assert torch.equal(out, w - basis.T @ (basis @ w)) and norm == float(out.norm())


def test_lanczos_leaves_the_callers_products_as_they_were() -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(8, 8, generator=g, dtype=torch.float64)
    a = a + a.T
    kept: list[torch.Tensor] = []

    def hvp(v: torch.Tensor) -> torch.Tensor:
        kept.append(a @ v)
        return kept[-1]

    r = lanczos(hvp, 8, 6, torch.randn(8, generator=g, dtype=torch.float64))
    assert len(kept) == r.steps == 6
    for row, product in zip(r.basis, kept):
        assert torch.equal(product, a @ row)


# ----------------------------------------------------------------------------- top-k


def test_the_start_is_the_unit_gradient_plus_a_unit_random_or_warm_vector() -> None:
    model = tiny()
    x, y = data()
    ps: list[torch.Tensor] = list(model.parameters())
    grads, _ = first_order(model, LOSS, x, y, ps, "train")
    g = torch.cat([t.detach().reshape(-1) for t in grads if t is not None])
    random = start_vector(None, len(g), ps[0], 3)
    torch.testing.assert_close(lanczos_start(grads, ps, 3), g / g.norm() + random, rtol=0, atol=1e-15)
    warm = torch.randn(2, len(g), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    summed = warm.sum(0) / warm.sum(0).norm()
    torch.testing.assert_close(lanczos_start(grads, ps, 3, warm), g / g.norm() + summed, rtol=0, atol=1e-15)
    assert torch.equal(lanczos_start([None] * len(ps), ps, 3), random)  # no gradient: the unit vector alone
    with pytest.raises(ValueError, match=f"init has {len(g) + 1} entries, not a multiple of the parameters' {len(g)}"):
        lanczos_start(grads, ps, 3, torch.ones(len(g) + 1, dtype=torch.float64))
    assert torch.equal(lanczos_start([torch.full_like(p, math.nan) for p in ps], ps, 3, warm), summed)
    first = ps[0].numel()  # a parameter the loss does not depend on: zeros in its place
    partial = lanczos_start([None, *grads[1:]], ps, 3)
    torch.testing.assert_close(partial, torch.cat([g.new_zeros(first), g[first:]]) / g[first:].norm() + random, rtol=0, atol=1e-15)


def test_top_eigenvalues_start_from_the_gradient() -> None:
    """Cold, the run is Lanczos from :func:`lanczos_start` (to the bit), and it finds the top eigenvalue."""
    model = tiny()
    x, y = data()
    ps: list[torch.Tensor] = list(model.parameters())
    grads, _ = first_order(model, LOSS, x, y, ps, "train")
    cold = top_eigenvalues(model, LOSS, x, y, k=1, tol=1e-6, seed=3)
    start = lanczos_start(grads, ps, 3)
    same = top_k(hvp_function(grads, ps), ps[0], len(start), 1, 1e-6, 100, start, 3)
    assert torch.equal(cold.values, same.values) and cold.iterations == same.iterations
    assert cold.converged and float(cold.values[0]) == pytest.approx(float(torch.linalg.eigvalsh(full_hessian(model, x, y))[-1]), rel=1e-6)


def _settled(k: int, tol: float, values: torch.Tensor, residuals: torch.Tensor) -> bool:
    """The stopping rule at a step whose Ritz values did not move since the step before."""
    done = top_converged(k, tol)
    done(values, residuals)
    return done(values, residuals)


def test_the_stopping_bound_counts_a_neighbours_residual_in_the_gap() -> None:
    """r**2 / gap with gap = distance to the nearest other Ritz value less that value's residual."""
    values = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    tol = 1e-3  # the top value may be off by 3e-3
    # r = 0.05: r**2 / 1 = 2.5e-3 passes when the neighbour at 2 is converged...
    assert _settled(1, tol, values, torch.tensor([0.0, 0.0, 0.05], dtype=torch.float64))
    # ...not when the neighbour has not converged (residual 0.4 > a quarter of the gap 0.6)
    assert not _settled(1, tol, values, torch.tensor([0.0, 0.4, 0.05], dtype=torch.float64))
    # a neighbour whose residual reaches theta leaves r alone: 0.05 > 3e-3
    assert not _settled(1, tol, values, torch.tensor([0.0, 1.5, 0.05], dtype=torch.float64))
    assert _settled(1, tol, values, torch.tensor([0.0, 1.5, 0.002], dtype=torch.float64))
    assert _settled(1, tol, values[2:], torch.tensor([0.002], dtype=torch.float64))  # one value: r alone
    assert not _settled(1, tol, values[2:], torch.tensor([0.05], dtype=torch.float64))
    # k = 2: the second value's nearest is the first (gap 1 - 0.05) and the third (1 - 0.0)
    assert _settled(2, tol, values, torch.tensor([0.05, 0.04, 0.05], dtype=torch.float64))
    assert not _settled(2, tol, values, torch.tensor([0.9, 0.04, 0.05], dtype=torch.float64))
    assert _settled(1, tol, torch.tensor([3.0, 3.0], dtype=torch.float64), torch.tensor([0.0, 0.0], dtype=torch.float64))


def test_a_gap_to_a_ritz_value_that_has_not_converged_is_not_trusted() -> None:
    """A neighbour 7 below with residual 2 says little of the eigenvalues near theta: r decides."""
    values = torch.tensor([1.2, 8.2], dtype=torch.float64)
    residuals = torch.tensor([2.0, 1.5], dtype=torch.float64)  # r**2 / (7 - 2) = 0.45 <= 0.1 * 8.2, but 2 > 5 / 4
    assert not _settled(1, 0.1, values, residuals)
    assert _settled(1, 0.1, values, torch.tensor([0.2, 1.5], dtype=torch.float64))  # converged: 0.33


def test_a_top_value_that_still_moves_by_more_than_tol_is_not_done() -> None:
    done = top_converged(1, 1e-3)
    values, residuals = torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([0.0, 0.05], dtype=torch.float64)
    assert not done(values, residuals)  # r**2 / gap = 2.5e-3 <= 3e-3, but the first step: nothing to compare with
    assert not done(values + torch.tensor([0.0, 0.01]), residuals)  # moved 0.01 > 3e-3
    assert done(values + torch.tensor([0.0, 0.011]), residuals)  # moved 0.001
    assert top_converged(1, 1e-3)(values, torch.tensor([0.0, 0.002]))  # r alone bounds it: no need to wait


def _spectrum_matrix(top: tuple[float, ...], n: int = 300, seed: int = 3) -> torch.Tensor:
    """A symmetric matrix with eigenvalues ``top`` above a bulk of n - len(top) in [-0.3, 3]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    bulk = torch.randn(n - len(top), generator=g, dtype=torch.float64).abs().clamp_max(3.3) - 0.3
    return q @ torch.diag(torch.cat([torch.tensor(top, dtype=torch.float64), bulk])) @ q.T


@pytest.mark.parametrize("tol", [1e-2, 1e-3])
def test_the_bound_holds_on_close_top_eigenvalues(tol: float) -> None:
    """Three top eigenvalues within 10%, random starts: the value is within tol of an eigenvalue
    every time, and at the default tol of the largest (the rule that trusted any gap missed both)."""
    a = _spectrum_matrix((10.0, 9.5, 9.0, 5.0))
    eigenvalues = torch.linalg.eigvalsh(a)
    off_any, off_largest = [], []
    for seed in range(20):
        start = torch.randn(len(a), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        value = float(top_k(lambda v: a @ v, a, len(a), 1, tol, 200, start, seed).values[0])
        off_any.append(float((eigenvalues - value).abs().min()) / value)
        off_largest.append(abs(float(eigenvalues[-1]) - value) / value)
    assert max(off_any) <= tol
    if tol == 1e-3:
        assert max(off_largest) <= tol


def test_a_warm_start_at_an_eigenvector_no_longer_on_top_still_finds_the_top() -> None:
    """After a step the previous top eigenvector can be another eigenvalue's: from it alone Lanczos
    stops at once, on the wrong eigenvalue (its residual is ~0); the gradient in the start prevents that."""
    model = tiny()
    x, y = data()
    evals, evecs = torch.linalg.eigh(full_hessian(model, x, y))
    second = evecs[:, -2]
    top = top_eigenvalues(model, LOSS, x, y, k=1, tol=1e-6, init=second)
    assert float(top.values[0]) == pytest.approx(float(evals[-1]), rel=1e-6)
    ps: list[torch.Tensor] = list(model.parameters())
    grads, _ = first_order(model, LOSS, x, y, ps, "train")
    alone = lanczos(hvp_function(grads, ps), len(second), 100, second, stop=lambda v, r: bool(r[-1] <= 1e-6 * v[-1].abs()))
    assert alone.steps == 1 and float(alone.values[-1]) == pytest.approx(float(evals[-2]), rel=1e-6)  # what the start alone gives


def test_products_are_zero_where_the_loss_does_not_depend_on_a_parameter() -> None:
    model = tiny()
    model.register_parameter("unused", nn.Parameter(torch.ones(3, dtype=torch.float64)))
    x, y = data()
    ps: list[torch.Tensor] = list(model.parameters())
    grads, _ = first_order(model, LOSS, x, y, ps, "train")
    assert grads[0] is None and ps[0] is model.unused
    hvp = hvp_function(grads, ps)
    vectors = torch.randn(2, sum(p.numel() for p in ps), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    products = torch.stack([hvp(v) for v in vectors])
    assert torch.equal(products[:, :3], torch.zeros(2, 3, dtype=torch.float64))
    torch.testing.assert_close(products, vectors @ full_hessian(model, x, y), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_top_k_matches_eigvalsh(mode: str) -> None:
    model, ref = bn_model(mode)
    x, y = data()
    h = full_hessian(ref, x, y)
    expected = torch.linalg.eigvalsh(h).flip(0)[:4]
    res = top_eigenvalues(model, LOSS, x, y, k=4, tol=1e-10, max_iter=200, bn_mode=mode)
    assert res.converged and res.bn_mode == mode and res.samples == 10
    torch.testing.assert_close(res.values, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(res.vectors @ res.vectors.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-8)
    true_residuals = (res.vectors @ h - res.values[:, None] * res.vectors).norm(dim=1)
    assert (true_residuals <= 1e-4 * res.values.abs()).all()
    loose = top_eigenvalues(model, LOSS, x, y, k=1, tol=1e-3, bn_mode=mode)
    assert float(loose.values[0]) == pytest.approx(float(expected[0]), rel=1e-3) and loose.iterations < res.iterations


def test_warm_start_reduces_iterations() -> None:
    model = tiny()
    x, y = data()
    cold = top_eigenvalues(model, LOSS, x, y, k=2, tol=1e-8, max_iter=200)
    with torch.no_grad():  # a small training step later: the previous Ritz vectors are close
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    moved_cold = top_eigenvalues(model, LOSS, x, y, k=2, tol=1e-8, max_iter=200)
    moved_warm = top_eigenvalues(model, LOSS, x, y, k=2, tol=1e-8, max_iter=200, init=cold.vectors)
    assert moved_warm.iterations < moved_cold.iterations
    torch.testing.assert_close(moved_warm.values, moved_cold.values, rtol=1e-7, atol=0)


# ----------------------------------------------------------------------------- trace


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hutchinson_trace_and_its_standard_error(mode: str) -> None:
    model, ref = bn_model(mode)
    x, y = data()
    h = full_hessian(ref, x, y)
    m = 400
    res = hessian_trace(model, LOSS, x, y, samples=m, seed=3, bn_mode=mode)
    exact_stderr = math.sqrt(2 * off_diagonal_squares(h) / m)  # Rademacher: var(v'Hv) = 2 sum_{i!=j} H_ij^2
    assert abs(res.trace - float(h.trace())) < 4 * exact_stderr
    assert res.stderr == pytest.approx(exact_stderr, rel=0.15)
    assert res.samples == m and res.bn_mode == mode
    assert hessian_trace(model, LOSS, x, y, samples=m, seed=3, bn_mode=mode) == res  # reproducible


def test_rademacher_is_signs_from_its_generator() -> None:
    v = rademacher(1000, torch.Generator().manual_seed(0), torch.empty(0, dtype=torch.float64))
    assert set(v.tolist()) == {-1.0, 1.0} and abs(float(v.mean())) < 0.1
    assert torch.equal(v, rademacher(1000, torch.Generator().manual_seed(0), torch.empty(0, dtype=torch.float64)))


def test_blocks_top_eigenvalue_and_trace() -> None:
    model = tiny()
    x, y = data()
    h = full_hessian(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    m = 400
    blocks = block_spectra(model, LOSS, x, y, tol=1e-10, max_iter=200, samples=m, seed=5)
    assert list(blocks) == ["0", "1", "3"]
    whole = hessian_trace(model, LOSS, x, y, samples=m, seed=5)
    assert sum(b.trace for b in blocks.values()) == pytest.approx(whole.trace, rel=1e-10)  # same vectors, blocks cover all
    starts = np.cumsum([0, *sizes])
    for layer, b in blocks.items():
        idx = torch.cat([torch.arange(starts[k], starts[k + 1]) for k, n in enumerate(names) if n.split(".")[0] == layer])
        inside = h[idx][:, idx]
        assert float(b.top.values[0]) == pytest.approx(float(torch.linalg.eigvalsh(inside)[-1]), rel=1e-6), layer
        rows = h[idx]
        var = 2 * off_diagonal_squares(inside) + float(rows.square().sum() - inside.square().sum())  # cross terms count once
        assert abs(b.trace - float(inside.trace())) < 4 * math.sqrt(var / m), layer
        assert b.stderr == pytest.approx(math.sqrt(var / m), rel=0.15), layer


# ----------------------------------------------------------------------------- density


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_slq_quadrature_per_probe_and_moments(mode: str) -> None:
    """Per probe vector q (Rademacher / sqrt(n)), Gauss quadrature is exact: sum w theta^j = q' H^j q
    for j < 2 * steps; over many probes the moments are tr(H^j) / n in expectation."""
    model, ref = bn_model(mode)
    x, y = data()
    h = full_hessian(ref, x, y)
    n = h.shape[0]
    res = spectral_density(model, LOSS, x, y, probes=300, steps=6, seed=7, bn_mode=mode)
    assert res.nodes.shape == (300, 6) and res.parameters == n
    g = torch.Generator().manual_seed(7)
    for i in range(5):
        q = rademacher(n, g, h) / math.sqrt(n)
        for j in range(12):
            want = float(q @ torch.linalg.matrix_power(h, j) @ q)
            assert float((res.weights[i] * res.nodes[i] ** j).sum()) == pytest.approx(want, rel=1e-7, abs=1e-12), (i, j)
    for j, exact in ((1, float(h.trace())), (2, float(h.square().sum()))):
        per_probe = (res.weights * res.nodes**j).sum(1) * n
        stderr = float(per_probe.std()) / math.sqrt(len(per_probe))
        assert abs(float(per_probe.mean()) - exact) < 4 * stderr, j


def test_density_is_pyhessians_density_generate() -> None:
    g = np.random.default_rng(0)
    nodes, weights = g.normal(size=(3, 8)) * 4, g.random((3, 8))
    weights /= weights.sum(1, keepdims=True)
    grid, values = density(nodes, weights)
    # PyHessian's density_generate, written out
    low, high = np.mean(np.min(nodes, axis=1)) - 0.01, np.mean(np.max(nodes, axis=1)) + 0.01
    lo, hi = nodes.min() - 0.01, nodes.max() + 0.01
    assert grid[0] == pytest.approx(lo) and grid[-1] == pytest.approx(hi) and len(grid) == 10_000 and low >= lo and high <= hi
    var = 1e-5 * max(1, hi - lo)
    ref = np.array(
        [[np.sum(np.exp(-((x - nodes[i]) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var) * weights[i]) for x in grid] for i in range(3)]
    )
    ref = ref.mean(0)
    ref /= ref.sum() * (grid[1] - grid[0])
    np.testing.assert_allclose(values, ref, rtol=1e-9, atol=1e-12)
    peak_grid, peak = density(np.array([[1.0, 2.0]]), np.array([[1.0, 0.0]]), grid=np.linspace(0, 2, 2001), sigma=0.1)
    assert peak_grid[np.argmax(peak)] == pytest.approx(1.0)  # the zero-weight padding node adds nothing
    assert peak.max() == pytest.approx(1 / math.sqrt(2 * math.pi * 0.01), rel=1e-3)


# ----------------------------------------------------------------------------- leaving no trace


def test_every_pass_leaves_no_trace() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3)).double()
    x, y = data()
    model(x)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    for mode in ("train", "eval"):
        top_eigenvalues(model, LOSS, x, y, k=2, max_iter=20, bn_mode=mode)
        hessian_trace(model, LOSS, x, y, samples=3, bn_mode=mode)
        spectral_density(model, LOSS, x, y, probes=2, steps=5, bn_mode=mode)
        block_spectra(model, LOSS, x, y, max_iter=10, samples=3, bn_mode=mode)
        assert torch.equal(torch.get_rng_state(), rng)
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
        assert all(p.grad is not None and torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
        assert model.training and model[1].training and model[1].track_running_stats
    with pytest.raises(ConfigError, match="unknown BN mode 'frozen'"):
        hessian_trace(model, LOSS, x, y, bn_mode="frozen")


# ----------------------------------------------------------------------------- the probe in a run

DLN = (
    "name: s\nmodel: dln\nmodel_options: {{depth: 3, width: 4}}\ndata: synthetic:linear\ndata_options: {{n: 64, dim: 4}}\n"
    "steps: {steps}\nbatch_size: 16\nlr: 0.05\nseed: 1\n"
    "probes:\n  moments: {{every: 2}}\n"
    "  spectrum: {{enabled: true, k: 2, tol: 1.0e-9, max_iter: 200, trace_samples: 300, density_probes: 2, density_steps: 5,\n"
    "    blocks: true, block_density: true}}\n"
)


def test_train_records_the_spectrum_section(in_tmp: Path) -> None:
    """``bnprobe train`` with the probe on: top-k, trace and density at step 0 equal the full Hessian's."""
    from bnprobe.cli import app
    from bnprobe.data import batches, load_data
    from bnprobe.store import read_file, strings
    from bnprobe.trainer import prepare_model

    Path("s.yaml").write_text(DLN.format(steps=3))
    result = CliRunner().invoke(app, ["train", "s.yaml", "-o", "s.h5"])
    assert result.exit_code == 0, result.output
    run = read_file("s.h5").runs["keep"]
    d = run.data
    assert d["spectrum/step"].tolist() == [0, 2]
    assert d["spectrum/top_k"].shape == (2, 2) and d["spectrum/density_nodes"].shape == (2, 2, 5)
    np.testing.assert_allclose(d["spectrum/density_weights"].sum(2), 1.0, rtol=1e-6)
    assert run.dataset_attrs["spectrum/top_k"]["bn_mode"] == "train" and run.dataset_attrs["spectrum/trace"]["vectors"] == 300
    blocks = strings(d["spectrum/block"])
    assert d["spectrum/block_trace"].shape == (2, len(blocks))
    assert d["spectrum/block_density_nodes"].shape == (2, len(blocks), 2, 5)
    np.testing.assert_allclose(d["spectrum/block_density_weights"].sum(3), 1.0, rtol=1e-6)

    cfg = load_config("s.yaml")
    bundle = load_data(cfg.data, seed=cfg.seed, **dict(cfg.data_options))
    model, _ = prepare_model(cfg, bundle, torch.device("cpu"))
    x, y = next(batches(bundle, cfg.batch_size, cfg.seed))
    model, x, y = model.double(), x.double(), y.double()
    h = full_hessian_of(model, x, y, nn.MSELoss())
    np.testing.assert_allclose(d["spectrum/top_k"][0], torch.linalg.eigvalsh(h).flip(0)[:2].numpy(), rtol=1e-4)
    assert abs(d["spectrum/trace"][0] - float(h.trace())) < 4 * d["spectrum/trace_stderr"][0]


def test_a_resumed_run_records_the_spectrum_of_an_uninterrupted_one(in_tmp: Path) -> None:
    from bnprobe.experiment import resume_experiment, run_experiment
    from bnprobe.store import read_file
    from bnprobe.trainer import StepInfo

    Path("s.yaml").write_text(DLN.format(steps=7).replace("tol: 1.0e-9", "tol: 1.0e-2"))
    run_experiment(load_config("s.yaml", {"checkpoint_every": 2, "output": "full.h5"}))

    def stop_at_5(info: StepInfo) -> None:
        if info.step == 5:
            raise KeyboardInterrupt("stopped by the test at step 5")

    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config("s.yaml", {"checkpoint_every": 2, "output": "cut.h5"}), progress=stop_at_5)
    resume_experiment(Path("cut.h5"))
    full, resumed = read_file("full.h5").runs["keep"].data, read_file("cut.h5").runs["keep"].data
    for key in [k for k in full if k.startswith("spectrum/")]:
        np.testing.assert_array_equal(full[key], resumed[key], err_msg=key)


@pytest.mark.parametrize("k", [1, 2])
def test_the_probe_starts_the_top_eigenvalue_warm_and_top_k_cold(k: int) -> None:
    from bnprobe.probes import StepBatch
    from bnprobe.probes.spectrum import SpectrumProbe, record_seed

    model = tiny()
    x, y = data()
    probe = SpectrumProbe(1, k, 1e-9, 200, 0, 0, 1, "train", len(x))
    batch = StepBatch(0, model, LOSS, x, y, torch.optim.SGD(model.parameters(), lr=0.1))
    probe.compute(batch)
    previous = probe._vectors
    assert (previous is None) == (k > 1)  # top-k keeps no vectors it would not start from
    second = probe.compute(dataclasses.replace(batch, step=1))
    expected = top_eigenvalues(model, LOSS, x, y, k=k, tol=1e-9, max_iter=200, init=previous if k == 1 else None, seed=record_seed(0, 1))
    assert second["iterations"] == expected.iterations
    np.testing.assert_array_equal(second["top_k"], expected.values.numpy())


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("spectrum.k", 0, "probes.spectrum.k must be at least 1"),
        ("spectrum.trace_samples", 1, "spectrum.trace_samples must be 0 .off. or at least 2"),
        ("hessian.bn_mode", "frozen", "probes.hessian.bn_mode: 'frozen' is not one of train, eval"),
        ("spectrum.max_iter", 0, "spectrum.max_iter must be at least probes.spectrum.k"),
        ("spectrum.density_steps", 0, "spectrum.density_steps must be at least 1"),
        ("spectrum.tol", 0, "spectrum.tol must be positive"),
        (
            "spectrum.block_density",
            True,
            "spectrum.block_density needs probes.spectrum.blocks: true and probes.spectrum.density_probes >= 1",
        ),
        ("spectrum_k", 0, "probes.spectrum.k must be at least 1"),  # the older flat key reaches the same check
    ],
)
def test_config_keys_are_checked(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {f"probes.{key}": value})


def test_block_density_is_each_blocks_own_spectrum() -> None:
    """With as many Lanczos steps as a block has parameters, each probe's quadrature is exact:
    its nodes of positive weight are eigenvalues of that block of the full Hessian, and the
    weighted sum of node**j equals q' H_b^j q for every j (checked through the mean and second moment
    over many probes against tr(H_b)/n_b and ||H_b||_F^2/n_b within 4 standard errors)."""
    model = tiny()
    x, y = data()
    h = full_hessian(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    starts = np.cumsum([0, *[p.numel() for p in model.parameters()]])
    blocks = block_spectra(model, LOSS, x, y, tol=1e-8, max_iter=100, samples=0, seed=3, density_probes=200, density_steps=40)
    for layer, b in blocks.items():
        idx = torch.cat([torch.arange(starts[k], starts[k + 1]) for k, n in enumerate(names) if n.split(".")[0] == layer])
        inside = h[idx][:, idx]
        exact = torch.linalg.eigvalsh(inside)
        assert b.nodes is not None and b.weights is not None and b.nodes.shape == (200, 40)
        torch.testing.assert_close(b.weights.sum(1), torch.ones(200, dtype=torch.float64), rtol=0, atol=1e-10)
        used = b.nodes[b.weights > 1e-8]
        assert float((used[:, None] - exact[None, :]).abs().min(1).values.max()) < 1e-6 * max(1.0, float(exact.abs().max())), layer
        n = len(idx)
        for j, expected in ((1, float(inside.trace()) / n), (2, float(inside.square().sum()) / n)):
            per_probe = (b.weights * b.nodes**j).sum(1)
            assert abs(float(per_probe.mean()) - expected) < 4 * float(per_probe.std()) / math.sqrt(200) + 1e-12, (layer, j)
