"""Config loading: safe YAML, typed validation, closest-key errors, CLI precedence, variants."""

import re
from pathlib import Path

import pytest

from bnprobe.config import BnMode, expand_variants, load_config, parse_assignments
from bnprobe.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_file_and_override_precedence(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "lr: 0.3\nsteps: 7\nprobes: {record_every: 2}\n"), {"lr": 0.01, "probes.per_channel": True})
    assert cfg.lr == 0.01 and cfg.steps == 7 and cfg.probes.record_every == 2 and cfg.probes.per_channel
    assert cfg.name == "c"  # from the file name
    assert cfg.output_path == Path("runs/c.h5")


def test_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    """YAML 1.1 reads ``1e-4`` as a string; a float field takes it as the number it means."""
    cfg = load_config(write(tmp_path, "lr: 1e-4\nprobes: {hessian_tol: 1E-6}\n"))
    assert cfg.lr == 1e-4 and cfg.probes.hessian_tol == 1e-6
    with pytest.raises(ConfigError, match="lr: expected a number"):
        load_config(write(tmp_path, "lr: fast\n"))


def test_set_assignments_reach_every_key(tmp_path: Path) -> None:
    sets = parse_assignments(["probes.hessian_tol=1e-5", "variants.lr=[0.1, 0.01]", "model_options={width: 0.5}", "name = x"])
    assert sets == {"probes.hessian_tol": "1e-5", "variants.lr": [0.1, 0.01], "model_options": {"width": 0.5}, "name": "x"}
    cfg = load_config(write(tmp_path, "lr: 0.3\n"), sets)
    assert cfg.probes.hessian_tol == 1e-5 and cfg.variants["lr"] == (0.1, 0.01) and dict(cfg.model_options) == {"width": 0.5}
    for bad in ("lr", "=3", "lr=", "lr=[1"):
        with pytest.raises(ConfigError, match="--set"):
            parse_assignments([bad])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lerning_rate: 0.1\n", "unknown key 'lerning_rate'; did you mean 'lr'"),
        ("probes: {record_evry: 3}\n", "unknown key 'probes.record_evry'; did you mean 'record_every'"),
        ("lr: -1\n", "lr must be positive"),
        ("steps: 0\n", "steps must be at least 1"),
        ("steps: ten\n", "steps: expected an integer"),
        ("bn: sometimes\n", "bn: 'sometimes' is not one of keep, insert, strip, noisy"),
        ("variants: {colour: [red]}\n", "cannot vary 'colour'"),
        ("bn: [keep, insert]\n", "list them under variants (variants: {bn: [keep, insert]})"),
        ("lr: [0.1\n", "invalid YAML"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "name: !!python/object/apply:os.system ['echo hacked']\n"))


def test_variants_expand_as_a_product(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "variants: {bn: [keep, insert], lr: [0.1, 0.01]}\n"))
    runs = expand_variants(cfg)
    assert [name for name, _ in runs] == ["keep-lr0.1", "keep-lr0.01", "insert-lr0.1", "insert-lr0.01"]
    assert runs[2][1].bn is BnMode.INSERT and runs[2][1].lr == 0.1 and not runs[2][1].variants


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "bn: noisy\nprobes: {layers: ['features.*']}\nvariants: {bn: [keep, noisy]}\n"))
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_yaml_aliases_are_refused_at_their_line(tmp_path: Path) -> None:
    """A 'billion laughs' config is a few lines that expand to 9**9 values; configs need no aliases."""
    with pytest.raises(ConfigError, match=r"line 2, column 8\): aliases \(\*name\) are not supported"):
        load_config(write(tmp_path, "x: &a [1, 2]\nsteps: *a\n"))
    with pytest.raises(ConfigError, match=r"--set probes.layers: .*\(aliases"):
        parse_assignments(["probes.layers=[&a [x], *a]"])


def test_messages_show_values_cut_short(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^name: expected a string, got \[.abcdefghij.") as info:
        load_config(write(tmp_path, "name: [" + ", ".join(["abcdefghij"] * 10000) + "]\n"))
    assert str(info.value).startswith("name: expected a string, got ['abcdefghij'") and len(str(info.value)) < 100


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed: 9223372036854775808\n", "seed: 9223372036854775808 is out of range"),
        ("seed: -1\n", "seed must be between 0 and 9223372036854775807"),
        ("momentum: .inf\n", "momentum: expected a finite number, got inf"),
        ("output: 'runs/{name[0]}.h5'\n", r"the only placeholder is \{name\}"),
        ("device: 'cuda:x'\n", "device must be auto, cpu, cuda"),
        ("model_options: {num_classes: 3}\n", "model_options cannot set spec, num_classes or input_shape"),
        ("data_options: {1: 2}\n", "data_options: option names must be strings, got 1"),
        ("variants: {lr: [0.1, 0.1]}\n", "variants.lr lists 0.1 twice"),
        ("probes: {kinds: [conv, bogus]}\n", "probes.kinds: unknown layer kind 'bogus'; choose from conv, linear, norm, other"),
        (
            "variants: {lr: ["
            + ", ".join(str(i + 1) for i in range(11))
            + "], momentum: ["
            + ", ".join(str(i) for i in range(10))
            + "]}\n",
            "more than 100 runs",
        ),
    ],
)
def test_values_out_of_range_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))
