"""plot: an image for each kind, one-line errors for missing data, options and matplotlib."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from _fixtures import write_run_file

from bnprobe import plot as plot_module
from bnprobe.errors import BnprobeError, ConfigError, StoreError
from bnprobe.plot import KINDS, plot
from bnprobe.store import Column, RunData, read_file

pytest.importorskip("matplotlib")
from matplotlib.colors import to_rgba

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def full_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run_file(tmp_path_factory.mktemp("plot") / "full.h5", steps=30, spectrum=True)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_writes_a_png(full_file: Path, tmp_path: Path, kind: str) -> None:
    out = plot([full_file], tmp_path / f"{kind}.png", kind=kind)
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_svg_pdf_and_two_files(full_file: Path, tmp_path: Path) -> None:
    other = write_run_file(tmp_path / "other.h5", variants=("keep",), steps=20, seed=2)
    svg = plot([full_file, other], tmp_path / "t.svg", kind="training")
    text = svg.read_text()
    # two files are grouped by condition, not by file: keep runs seed 0 in one and seed 2 in the other
    assert "<svg" in text and "keep (2 seeds)" in text and "BN (1 seed)" in text and "other:keep" not in text
    pdf = plot([full_file], tmp_path / "m.pdf", kind="moments", layer="fc2")
    assert pdf.read_bytes().startswith(b"%PDF")


def test_layer_choice(full_file: Path, tmp_path: Path) -> None:
    svg = plot([full_file], tmp_path / "m.svg", kind="moments")
    text = svg.read_text()
    # default: the layer before the output layer, per variant
    assert "keep, layer fc3 (linear)" in text and "insert, layer bn3 (norm)" in text
    svg = plot([full_file], tmp_path / "i.svg", kind="ics", layer="fc[12]")
    text = svg.read_text()
    assert "layer fc1" in text and "layer fc2" in text and "layer out" not in text
    with pytest.raises(ConfigError, match="matches no recorded layer; layers: fc1"):
        plot([full_file], tmp_path / "x.png", kind="moments", layer="conv*")
    with pytest.raises(ConfigError, match="matches no ICS layer"):
        plot([full_file], tmp_path / "x.png", kind="ics", layer="bn1")


def test_interrupted_and_regression_runs(tmp_path: Path) -> None:
    path = write_run_file(tmp_path / "crashed.h5", variants=("keep", "insert"), status=None, steps=12, regression=True, spectrum=True)
    for kind in KINDS:
        out = plot([path], tmp_path / f"{kind}.png", kind=kind)
        assert out.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("ics", "no ICS recorded in {path}; run bnprobe measure-ics"),
        ("landscape", "no landscape recorded in {path}; run bnprobe measure-ics with probes.landscape.enabled: true"),
        ("moments", "no moments recorded in {path}; run bnprobe train"),
        ("hessian", "no Hessian spectrum recorded in {path}; set probes.spectrum.enabled: true"),
    ],
)
def test_missing_section_is_one_line(tmp_path: Path, kind: str, message: str) -> None:
    path = write_run_file(tmp_path / "train_only.h5", variants=("keep",), sections=("train",))
    with pytest.raises(BnprobeError, match="^" + re.escape(message.format(path=path))) as info:
        plot([path], tmp_path / "x.png", kind=kind)
    assert str(info.value).startswith(message.format(path=path))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x.png").exists()


def test_bad_options(full_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="choose from training, moments, ics, landscape, hessian"):
        plot([full_file], tmp_path / "x.png", kind="spectrum")
    with pytest.raises(ConfigError, match=r"\.png, \.svg or \.pdf"):
        plot([full_file], tmp_path / "x.jpeg")
    with pytest.raises(ConfigError, match="choose from keep, insert, noisy"):
        plot([full_file], tmp_path / "x.png", variant="strip")
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"old")
    with pytest.raises(StoreError, match="already exists"):
        plot([full_file], existing)
    assert existing.read_bytes() == b"old"
    assert plot([full_file], existing, force=True).read_bytes().startswith(PNG_MAGIC)


def test_without_matplotlib_is_one_line(full_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BnprobeError, match="plotting needs matplotlib") as info:
        plot([full_file], tmp_path / "x.png")
    assert str(info.value) == "plotting needs matplotlib: pip install 'bnprobe[plot]'"


# ----------------------------------------------------------------------------- what is drawn


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures ``plot`` saves (the file is still written)."""
    from matplotlib.figure import Figure

    figures: list = []
    save = Figure.savefig

    def keep(self: Figure, *args: object, **kwargs: object) -> object:
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def _stored(path: Path) -> dict[str, dict[str, np.ndarray | list[str]]]:
    """Per variant, every dataset of the run (float64) and its layer names, straight from h5py."""
    out: dict[str, dict] = {}
    with h5py.File(path, "r") as h5:
        for variant, g in h5["runs"].items():
            d: dict = {}
            g.visititems(
                lambda k, v, d=d: (
                    d.__setitem__(k, np.asarray(v[()], dtype=np.float64))
                    if isinstance(v, h5py.Dataset) and v.dtype.kind in "biuf"
                    else None
                )
            )
            order = np.argsort(g["layers"]["order"])
            d["layer_names"] = [g["layers"]["name"][i].decode() for i in order]
            d["ics_names"] = [n.decode() for n in g["ics/layer"][()]] if "ics/layer" in g else []
            out[variant] = d
    return out


def _same_xy(line: object, x: np.ndarray, y: np.ndarray) -> bool:
    lx, ly = np.asarray(line.get_xdata(), dtype=np.float64), np.asarray(line.get_ydata(), dtype=np.float64)  # type: ignore[attr-defined]
    return lx.shape == x.shape and ly.shape == y.shape and np.array_equal(lx, x) and np.allclose(ly, y, rtol=1e-12, atol=0, equal_nan=True)


def _by_color(ax: object) -> dict[tuple, list]:
    groups: dict[tuple, list] = {}
    for line in ax.get_lines():  # type: ignore[attr-defined]
        groups.setdefault(tuple(np.round(to_rgba(line.get_color())[:3], 6)), []).append(line)
    return groups


def _labelled(ax: object, label: str) -> list:
    return [line for line in ax.get_lines() if line.get_label() == label]  # type: ignore[attr-defined]


def test_moments_draws_the_three_percentiles_of_the_file(full_file: Path, tmp_path: Path, drawn: list) -> None:
    plot([full_file], tmp_path / "m.png", kind="moments")
    (fig,) = drawn
    (ax,) = fig.axes
    stored = _stored(full_file)
    groups = _by_color(ax)
    assert len(groups) == len(stored) == 3
    for variant, d in stored.items():
        name = d["layer_names"][-2]  # default: the layer before the output layer
        j = d["layer_names"].index(name)
        steps = d["moments/step"]
        p15, p50, p85 = (d[f"moments/{p}"][:, j] for p in ("p15", "p50", "p85"))
        assert not np.array_equal(p15, p50) and not np.array_equal(p50, p85)
        (median,) = [line for line in ax.get_lines() if line.get_label().startswith(f"{variant}, layer {name} ")]
        assert _same_xy(median, steps, p50)
        group = groups[tuple(np.round(to_rgba(median.get_color())[:3], 6))]
        assert len(group) == 3
        rest = [line for line in group if line is not median]
        # the other two: one is p15, the other p85
        assert sorted(_same_xy(lay, steps, p15) for lay in rest) == [False, True]
        assert sorted(_same_xy(lay, steps, p85) for lay in rest) == [False, True]
        # the shaded band spans p15..p85
        (band,) = [c for c in ax.collections if np.allclose(c.get_facecolor()[0][:3], to_rgba(median.get_color())[:3])]
        vertices = {tuple(v) for v in band.get_paths()[0].vertices.tolist()}
        assert {(float(s), float(v)) for s, v in zip(steps, p15)} <= vertices
        assert {(float(s), float(v)) for s, v in zip(steps, p85)} <= vertices


def test_moments_of_several_seeds_draw_their_mean_percentiles(full_file: Path, tmp_path: Path, drawn: list) -> None:
    """keep at seeds 0 and 2: each seed's median faint, and the seeds' mean 15th, 50th and 85th
    percentiles (over the steps both have) drawn as one run's would be."""
    other = write_run_file(tmp_path / "other.h5", variants=("keep",), steps=20, seed=2)
    plot([full_file, other], tmp_path / "m.png", kind="moments", layer="fc2")
    (fig,) = drawn
    (ax,) = fig.axes
    first, second = _stored(full_file)["keep"], _stored(other)["keep"]
    shared = np.intersect1d(first["moments/step"], second["moments/step"])
    assert 0 < len(shared) < len(first["moments/step"])

    def mean(p: str) -> np.ndarray:
        return (
            sum(d[f"moments/{p}"][np.searchsorted(d["moments/step"], shared), d["layer_names"].index("fc2")] for d in (first, second)) / 2
        )

    (median,) = [line for line in ax.get_lines() if line.get_label().startswith("keep (2 seeds), layer fc2")]
    assert _same_xy(median, shared, mean("p50"))
    group = _by_color(ax)[tuple(np.round(to_rgba(median.get_color())[:3], 6))]
    dashed = [line for line in group if line.get_linestyle() == "--"]
    assert sorted(_same_xy(line, shared, mean("p15")) for line in dashed) == [False, True]
    assert sorted(_same_xy(line, shared, mean("p85")) for line in dashed) == [False, True]
    faint = [line for line in group if line.get_alpha() == 0.3]
    assert len(faint) == 2 and any(
        _same_xy(line, first["moments/step"], first["moments/p50"][:, first["layer_names"].index("fc2")]) for line in faint
    )


def test_ics_draws_l2_and_cosine_of_the_file(full_file: Path, tmp_path: Path, drawn: list) -> None:
    plot([full_file], tmp_path / "i.png", kind="ics")
    (fig,) = drawn
    axes = np.array(fig.axes).reshape(-1, 2)
    stored = _stored(full_file)
    rows = [ax.get_ylabel().splitlines()[0].removeprefix("layer ") for ax in axes[:, 0]]
    assert rows == ["fc2", "fc3", "out"]  # the first layer has no shift by definition
    for r, name in enumerate(rows):
        for variant, d in stored.items():
            j = d["ics_names"].index(name)
            (l2,) = _labelled(axes[r][0], variant)
            (cos,) = _labelled(axes[r][1], variant)
            assert _same_xy(l2, d["ics/step"], d["ics/l2"][:, j]), (name, variant)
            assert _same_xy(cos, d["ics/step"], d["ics/cosine"][:, j]), (name, variant)
    assert not np.array_equal(stored["keep"]["ics/l2"][:, 1], stored["keep"]["ics/cosine"][:, 1])


def test_ics_draws_a_conditions_seeds_faint_and_their_mean_bold(full_file: Path, tmp_path: Path, drawn: list) -> None:
    """keep at seed 0 (one file) and seed 2 (another) are one condition: two faint lines per panel
    and their mean bold over the steps both have; BN, with one seed, is one line."""
    other = write_run_file(tmp_path / "other.h5", variants=("keep",), steps=20, seed=2)
    plot([full_file, other], tmp_path / "i.png", kind="ics")
    (fig,) = drawn
    axes = np.array(fig.axes).reshape(-1, 2)
    first, second = _stored(full_file)["keep"], _stored(other)["keep"]
    shared = np.intersect1d(first["ics/step"], second["ics/step"])
    assert 0 < len(shared) < len(first["ics/step"])  # the mean covers only the steps both have
    for r, ax_row in enumerate(axes):
        name = ax_row[0].get_ylabel().splitlines()[0].removeprefix("layer ")
        for ax, quantity in zip(ax_row, ("l2", "cosine")):
            (mean,) = _labelled(ax, "keep (2 seeds)")
            at = [d[f"ics/{quantity}"][np.searchsorted(d["ics/step"], shared), d["ics_names"].index(name)] for d in (first, second)]
            assert _same_xy(mean, shared, (at[0] + at[1]) / 2), (r, quantity)
            faint = [line for line in _by_color(ax)[tuple(np.round(to_rgba(mean.get_color())[:3], 6))] if line is not mean]
            assert len(faint) == 2 and all(line.get_alpha() == 0.3 for line in faint)
            assert len(_labelled(ax, "BN (1 seed)")) == 1


def test_landscape_draws_the_range_over_eta_and_beta(full_file: Path, tmp_path: Path, drawn: list) -> None:
    plot([full_file], tmp_path / "l.png", kind="landscape")
    (fig,) = drawn
    loss_ax, grad_ax, beta_ax = fig.axes
    for variant, d in _stored(full_file).items():
        steps = d["landscape/step"]
        (beta,) = _labelled(beta_ax, variant)
        assert _same_xy(beta, steps, d["landscape/beta_smoothness"])
        color = tuple(np.round(to_rgba(beta.get_color())[:3], 6))
        for ax, key in ((loss_ax, "landscape/loss"), (grad_ax, "landscape/grad_l2")):
            lo, hi = d[key].min(axis=1), d[key].max(axis=1)
            assert not np.array_equal(lo, hi)
            lines = _by_color(ax)[color]
            assert len(lines) == 2 and any(_same_xy(lay, steps, lo) for lay in lines) and any(_same_xy(lay, steps, hi) for lay in lines), (
                variant,
                key,
            )


def test_training_draws_loss_and_accuracy_of_the_file(full_file: Path, tmp_path: Path, drawn: list) -> None:
    plot([full_file], tmp_path / "t.png", kind="training")
    (fig,) = drawn
    loss_ax, acc_ax = fig.axes
    for variant, d in _stored(full_file).items():
        (loss,) = _labelled(loss_ax, variant)
        (acc,) = _labelled(acc_ax, variant)
        assert _same_xy(loss, d["train/step"], d["train/loss"])
        assert _same_xy(acc, d["train/step"], 100 * d["train/accuracy"])


def test_a_chosen_layer_is_the_one_drawn(full_file: Path, tmp_path: Path, drawn: list) -> None:
    plot([full_file], tmp_path / "m.png", kind="moments", layer="fc2")
    d = _stored(full_file)["insert"]
    j = d["layer_names"].index("fc2")
    (median,) = [line for line in drawn[0].axes[0].get_lines() if line.get_label().startswith("insert, layer fc2 ")]
    assert _same_xy(median, d["moments/step"], d["moments/p50"][:, j])


def test_a_failed_write_leaves_the_old_file(full_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    out = tmp_path / "f.png"
    out.write_bytes(b"old")

    def full_disk(self: Figure, fname: object, **kwargs: object) -> None:
        Path(str(fname)).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(StoreError, match=r"cannot write .*f\.png: No space left on device"):
        plot([full_file], out, kind="training", force=True)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.png"]


def test_hessian_draws_the_last_density_and_the_top_eigenvalues_of_the_file(tmp_path: Path, drawn: list) -> None:
    path = write_run_file(tmp_path / "s.h5", variants=("keep", "insert"), spectrum=True)
    with h5py.File(path, "r+") as f:  # the second record's trace within two standard errors of zero: no share
        f["runs/insert/spectrum/trace"][1] = f["runs/insert/spectrum/trace_stderr"][1]
    plot([path], tmp_path / "h.png", kind="hessian")
    (fig,) = drawn
    density_ax, top_ax = fig.axes[:2]
    data = read_file(path).runs["insert"].data
    steps, top = data["spectrum/step"], data["spectrum/top_k"]
    assert any(_same_xy(line, steps, top[:, 0]) for line in top_ax.get_lines())  # λ1 of insert over steps
    assert any(_same_xy(line, steps, top[:, 2]) for line in top_ax.get_lines())
    trace, stderr = data["spectrum/trace"], data["spectrum/trace_stderr"]
    kept = trace > 2 * stderr
    assert not kept[1] and kept.sum() >= 2
    (share,) = _labelled(fig.axes[2], "insert")  # λ1 / tr(H) over the records whose trace is clear of zero
    assert _same_xy(share, steps[kept], top[kept, 0] / trace[kept])
    assert density_ax.get_yscale() == "log" and len(density_ax.get_lines()) == 2
    grid, density = density_ax.get_lines()[1].get_data()
    nodes, weights = data["spectrum/density_nodes"][-1], data["spectrum/density_weights"][-1]
    step = grid[1] - grid[0]
    assert density.sum() * step == pytest.approx(1.0, rel=1e-6)  # a density on its grid (PyHessian's normalisation)
    mean = (grid * density).sum() * step
    assert mean == pytest.approx(float((weights * nodes).sum(axis=1).mean()), rel=1e-3, abs=1e-3)  # the quadrature's mean


def test_hessian_without_a_trace_says_so_in_the_share_panel(tmp_path: Path, drawn: list) -> None:
    path = write_run_file(tmp_path / "s.h5", variants=("keep",), spectrum=True)
    with h5py.File(path, "r+") as f:
        del f["runs/keep/spectrum/trace"]
    plot([path], tmp_path / "h.png", kind="hessian")
    share_ax = drawn[0].axes[2]
    assert not share_ax.get_lines() and share_ax.get_legend() is None
    assert [t.get_text() for t in share_ax.texts] == ["no trace clear of zero recorded"]


@pytest.mark.parametrize("kind", ["moments", "ics", "landscape", "hessian", "training"])
def test_records_steps_apart_are_marked_and_every_step_is_a_plain_line(full_file: Path, tmp_path: Path, drawn: list, kind: str) -> None:
    """A line between sparse records would suggest data between them: each record gets a marker."""
    plot([full_file], tmp_path / "p.png", kind=kind)
    over_steps = [ax for ax in drawn[0].axes if ax.get_xlabel() == "training step"]
    lines = [line for ax in over_steps for line in ax.get_lines() if line.get_transform() == ax.transData]  # not the axhline
    assert lines
    marked = {line.get_marker() not in ("None", "", " ", None) for line in lines}
    assert marked == ({False} if kind == "training" else {True})  # the fixture logs every step, records every 5th


@pytest.mark.parametrize(("kind", "quantity"), [("moments", "p50"), ("training", "loss")])
def test_a_long_run_is_drawn_as_means_of_even_runs_of_records(
    tmp_path: Path, drawn: list, monkeypatch: pytest.MonkeyPatch, kind: str, quantity: str
) -> None:
    """More records than a line's points (here 7): each point is the mean of an even run of
    records, steps and values alike, and bears no marker; a long run then draws in the memory of a
    short one."""
    monkeypatch.setattr(plot_module, "PLOT_POINTS", 7)
    path = write_run_file(tmp_path / "f.h5", variants=("keep",))  # 40 steps, moments every 5th: 8 records
    plot([path], tmp_path / "p.png", kind=kind)
    d = _stored(path)["keep"]
    section = "train" if kind == "training" else "moments"
    steps, values = d[f"{section}/step"], d[f"{section}/{quantity}"]
    values = values if values.ndim == 1 else values[:, d["layer_names"].index(d["layer_names"][-2])]
    bins = np.array_split(np.arange(len(steps)), 7)
    line = next(line for line in drawn[0].axes[0].get_lines() if line.get_linewidth() >= 1.2)  # the loss, or the median
    assert _same_xy(line, np.array([steps[b].mean() for b in bins]), np.array([values[b].mean() for b in bins]))
    assert line.get_marker() in ("None", "", " ", None)


def _seed_column(seed: int, bn: bool, loss: list[float]) -> Column:
    attrs = {"bn": "insert" if bn else "keep", "bn_layers": 2 if bn else 0, "seed": seed, "status": "finished"}
    run = RunData(f"{'bn' if bn else 'plain'}-seed{seed}", attrs, [])
    run.data["train/step"] = np.arange(len(loss))
    run.data["train/loss"] = np.asarray(loss)
    return Column(run.name, Path("f.h5"), run)


def test_replicates_are_faint_and_their_mean_bold() -> None:
    """Two seeds of one condition: two faint lines, then the mean over the steps both have, labelled
    with the condition and its seed count; a condition of one seed is one plain line."""
    import matplotlib.pyplot as plt

    from bnprobe.plot import _groups, _replicates, _train_series

    columns = [_seed_column(0, False, [3.0, 2.0, 1.0]), _seed_column(1, False, [1.0, 2.0]), _seed_column(0, True, [1.0, 0.5, 0.2])]
    groups = _groups(columns)
    assert [(g.label, [c.run.name for c in g.columns]) for g in groups] == [
        ("no BN (2 seeds)", ["plain-seed0", "plain-seed1"]),
        ("BN (1 seed)", ["bn-seed0"]),
    ]
    fig, ax = plt.subplots()
    try:
        for group in groups:
            _replicates(ax, group, _train_series(group, "loss"))
        faint, faint2, mean, single = ax.get_lines()
        assert faint.get_alpha() == faint2.get_alpha() == 0.3 and faint.get_label().startswith("_")
        assert mean.get_xdata().tolist() == [0, 1] and mean.get_ydata().tolist() == [2.0, 2.0]
        assert mean.get_label() == "no BN (2 seeds)" and mean.get_linewidth() > faint.get_linewidth()
        assert single.get_ydata().tolist() == [1.0, 0.5, 0.2] and single.get_label() == "BN (1 seed)"
    finally:
        plt.close(fig)
    # without replicates, one group per run, labelled by its column
    assert [g.label for g in _groups(columns[:1] + columns[2:])] == ["plain-seed0", "bn-seed0"]
