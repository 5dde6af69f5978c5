"""plot: an image for each kind, one-line errors for missing data, options and matplotlib."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from _fixtures import write_run_file
from bnprobe.errors import BnprobeError, ConfigError, StoreError
from bnprobe.plot import KINDS, plot

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def full_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run_file(tmp_path_factory.mktemp("plot") / "full.h5", steps=30)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_writes_a_png(full_file: Path, tmp_path: Path, kind: str) -> None:
    out = plot([full_file], tmp_path / f"{kind}.png", kind=kind)
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_svg_pdf_and_two_files(full_file: Path, tmp_path: Path) -> None:
    other = write_run_file(tmp_path / "other.h5", variants=("keep",), steps=20, seed=2)
    svg = plot([full_file, other], tmp_path / "t.svg", kind="training")
    text = svg.read_text()
    assert "<svg" in text and "other:keep" in text and "full:insert" in text
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
    path = write_run_file(tmp_path / "crashed.h5", variants=("keep", "insert"), status=None, steps=12, regression=True)
    for kind in KINDS:
        out = plot([path], tmp_path / f"{kind}.png", kind=kind)
        assert out.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("ics", "no ICS recorded in {path}; run bnprobe measure-ics"),
        ("landscape", "no landscape recorded in {path}; run bnprobe measure-ics with probes.landscape: true"),
        ("moments", "no moments recorded in {path}; run bnprobe train"),
    ],
)
def test_missing_section_is_one_line(tmp_path: Path, kind: str, message: str) -> None:
    path = write_run_file(tmp_path / "train_only.h5", variants=("keep",), sections=("train",))
    with pytest.raises(BnprobeError) as info:
        plot([path], tmp_path / "x.png", kind=kind)
    assert str(info.value).startswith(message.format(path=path))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x.png").exists()


def test_bad_options(full_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="choose from moments, ics, landscape, training"):
        plot([full_file], tmp_path / "x.png", kind="hessian")
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
    with pytest.raises(BnprobeError) as info:
        plot([full_file], tmp_path / "x.png")
    assert str(info.value) == "plotting needs matplotlib: pip install 'bnprobe[plot]'"
