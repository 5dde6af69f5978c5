"""Config loading: safe YAML, typed validation, closest-key errors, CLI precedence, variants."""

import re
from pathlib import Path

import pytest

from bnprobe.config import (
    DEFAULT_CONFIG,
    LAYER_KINDS,
    BnMode,
    IcsMethod,
    LayerKind,
    RenamedKeyWarning,
    bn_overrides,
    check_continuable,
    config_for_ics,
    config_for_measure,
    config_for_train,
    expand_variants,
    load_config,
    load_config_text,
    parse_assignments,
)
from bnprobe.errors import ConfigError
from bnprobe.probe_config import RENAMED, ProbeConfig


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_file_and_override_precedence(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "lr: 0.3\nsteps: 7\nprobes: {moments: {every: 2}}\n"), {"lr": 0.01, "probes.moments.per_channel": True}
    )
    assert cfg.lr == 0.01 and cfg.steps == 7 and cfg.probes.moments.every == 2 and cfg.probes.moments.per_channel
    assert cfg.name == "c"  # from the file name
    assert cfg.output_path == Path("runs/c.h5")


def test_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    """YAML 1.1 reads ``1e-4`` as a string; a float field takes it as the number it means."""
    cfg = load_config(write(tmp_path, "lr: 1e-4\nprobes: {hessian: {tol: 1E-6}}\n"))
    assert cfg.lr == 1e-4 and cfg.probes.hessian.tol == 1e-6
    with pytest.raises(ConfigError, match="lr: expected a number"):
        load_config(write(tmp_path, "lr: fast\n"))


def test_set_assignments_reach_every_key(tmp_path: Path) -> None:
    sets = parse_assignments(["probes.hessian.tol=1e-5", "variants.lr=[0.1, 0.01]", "model_options={width: 0.5}", "name = x"])
    assert sets == {"probes.hessian.tol": "1e-5", "variants.lr": [0.1, 0.01], "model_options": {"width": 0.5}, "name": "x"}
    cfg = load_config(write(tmp_path, "lr: 0.3\n"), sets)
    assert cfg.probes.hessian.tol == 1e-5 and cfg.variants["lr"] == (0.1, 0.01) and dict(cfg.model_options) == {"width": 0.5}
    for bad in ("lr", "=3", "lr=", "lr=[1"):
        with pytest.raises(ConfigError, match="--set"):
            parse_assignments([bad])


def test_an_explicit_null_model_option_is_kept(tmp_path: Path) -> None:
    """``--set model_options.weights_backbone=null`` is a value for the factory, not an option left out."""
    path = write(tmp_path, "model: vgg\n")
    cfg = config_for_train(path, {"lr": None} | parse_assignments(["model_options.weights_backbone=null"]))
    assert dict(cfg.model_options) == {"weights_backbone": None}
    assert cfg.lr == load_config(path).lr  # elsewhere None still means "not given"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lerning_rate: 0.1\n", "unknown key 'lerning_rate'; did you mean 'lr'"),
        ("probes: {record_evry: 3}\n", "unknown key 'probes.record_evry'; did you mean 'moments.every'"),
        ("probes: {hessian: {tool: 3}}\n", "unknown key 'probes.hessian.tool'; did you mean 'tol'"),
        ("probes: {spectrum: {k: 5, max_iter: 3}}\n", "probes.spectrum.max_iter must be at least probes.spectrum.k"),
        ("probes: {moments: {every: 0}}\n", "probes.moments.every must be at least 1"),
        ("lr: -1\n", "lr must be positive"),
        ("steps: 0\n", "steps must be at least 1"),
        ("steps: ten\n", "steps: expected an integer"),
        ("bn: sometimes\n", "bn: 'sometimes' is not one of keep, insert, strip, noisy"),
        ("variants: {colour: [red]}\n", "cannot vary 'colour'"),
        ("variants: {qqqqqq: [1]}\n", "cannot vary 'qqqqqq'; valid keys: bn, seed, lr, optimizer,"),
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


def test_train_runs_the_packaged_quickstart_by_default() -> None:
    cfg = config_for_train(None, {})
    assert DEFAULT_CONFIG.is_file() and DEFAULT_CONFIG.parent.parent.name == "bnprobe"  # inside the package: it ships in the wheel
    assert cfg.name == "quickstart" and cfg.variants["bn"] == (BnMode.KEEP, BnMode.INSERT)


def test_a_new_model_or_data_starts_from_empty_options(tmp_path: Path) -> None:
    path = write(tmp_path, "model: vgg\nmodel_options: {width: 0.5}\ndata: synthetic:cifar10\ndata_options: {n: 64}\n")
    assert dict(config_for_train(path, {"model": "vgg"}).model_options) == {"width": 0.5}  # the same model keeps them
    cfg = config_for_train(path, {"model": "mlp", "model_options.hidden": 7})
    assert dict(cfg.model_options) == {"hidden": 7} and dict(cfg.data_options) == {"n": 64}
    assert dict(config_for_train(path, {"data": "synthetic:mnist"}).data_options) == {}
    assert dict(config_for_train(path, {"model": "mlp", "model_options": {"depth": 2}}).model_options) == {"depth": 2}


def test_one_bn_mode_replaces_the_files_bn_variants(tmp_path: Path) -> None:
    path = write(tmp_path, "variants: {bn: [keep, insert], lr: [0.1, 0.2]}\n")
    one = config_for_train(path, bn_overrides(["strip"]))
    assert one.bn is BnMode.STRIP and dict(one.variants) == {"lr": (0.1, 0.2)}
    two = config_for_train(path, bn_overrides(["strip", "noisy"]))
    assert two.variants["bn"] == (BnMode.STRIP, BnMode.NOISY) and two.variants["lr"] == (0.1, 0.2)
    assert bn_overrides(None) == {} and bn_overrides([]) == {}


def test_measure_ics_measures_ics(tmp_path: Path) -> None:
    path = write(tmp_path, "steps: 5\n")
    assert config_for_ics(path, {}).probes.ics.every == 10
    assert config_for_ics(path, {"probes.ics.every": 3}).probes.ics.every == 3
    assert config_for_ics(path, {"probes.ics.every": 0}).probes.ics.every == 10


def test_continuing_a_run_file_counts_further_steps() -> None:
    stored = "name: r\nsteps: 6\nprobes: {ics: {every: 4}}\n"
    cfg, further = config_for_measure(stored, "r.h5", {"steps": 3, "lr": 0.5})
    assert (cfg.steps, further, cfg.lr, cfg.probes.ics.every) == (6, 3, 0.5, 4)
    cfg, further = config_for_measure("name: r\n", "r.h5", {})
    assert further is None and cfg.probes.ics.every == 10
    for steps, message in (
        (0, r"steps must be at least 1 \(the number of further steps\)"),
        ("abc", "steps: expected an integer, got 'abc'"),
    ):
        with pytest.raises(ConfigError, match=f"^{message}$"):
            config_for_measure(stored, "r.h5", {"steps": steps})
    with pytest.raises(ConfigError, match=r"^r\.h5 holds no config$"):
        config_for_measure(3, "r.h5", {})


def test_continuing_refuses_what_the_weights_fit() -> None:
    with pytest.raises(ConfigError, match=r"^seed and model_options\.width cannot change when continuing r\.h5: its weights fit"):
        config_for_measure("name: r\n", "r.h5", {"seed": 3, "lr": 0.1, "model_options.width": 2})
    with pytest.raises(ConfigError, match=r"^--bn and --set data cannot change when continuing r\.h5"):
        check_continuable({"variants.bn": ["keep", "strip"], "lr": 1.0, "data": "x"}, "r.h5", {"variants.bn": "--bn", "data": "--set data"})
    check_continuable({"lr": 0.1, "steps": 3, "probes.ics.every": 2, "output": "o.h5"}, "r.h5")


def test_layers_given_as_one_string_are_comma_separated_globs(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "probes: {layers: 'features.*, fc'}\n")).probes.layers == ("features.*", "fc")
    assert load_config(write(tmp_path, "probes: {layers: ['a,b']}\n")).probes.layers == ("a,b",)  # a list is taken as it is


def test_enums_compare_and_dump_as_their_strings(tmp_path: Path) -> None:
    assert LAYER_KINDS == tuple(LayerKind) == ("conv", "linear", "norm", "other")
    assert IcsMethod("naive") == "naive" and [m.value for m in IcsMethod] == ["fast", "naive"]
    assert load_config(write(tmp_path, "probes: {kinds: [conv, norm]}\n")).to_dict()["probes"]["kinds"] == ["conv", "norm"]


def test_seed_is_a_variant_axis_of_replicates() -> None:
    cfg = load_config_text("variants: {bn: [keep, insert], seed: [0, 1]}\n", "test")
    runs = expand_variants(cfg)
    assert [(name, c.bn.value, c.seed) for name, c in runs] == [
        ("keep-seed0", "keep", 0),
        ("keep-seed1", "keep", 1),
        ("insert-seed0", "insert", 0),
        ("insert-seed1", "insert", 1),
    ]


def test_a_key_given_twice_is_refused_naming_it_and_its_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("(line 4, column 3): key 'moments' is given twice")):
        load_config(write(tmp_path, "probes:\n  moments: {every: 2}\n  layers: ['*']\n  moments: {every: 4}\n"))
    with pytest.raises(ConfigError, match=re.escape("(line 3, column 1): key 'lr' is given twice")):
        load_config(write(tmp_path, "lr: 0.1\nsteps: 3\nlr: 0.2\n"))


def test_model_variants_from_files_are_named_without_their_folders() -> None:
    """A run's name is a group of the file and holds no '/'; names that would collide are refused
    before anything trains."""
    cfg = load_config_text("variants: {model: [mlp, ./m.py:make, torchvision:resnet18]}\n", "test")
    assert [name for name, _ in expand_variants(cfg)] == ["modelmlp", "modelm-make", "modeltorchvision:resnet18"]
    with pytest.raises(ConfigError, match="two runs would be named 'modelm-make'"):
        expand_variants(load_config_text("variants: {model: [a/m.py:make, b/m.py:make]}\n", "test"))


def test_a_model_override_names_the_output_after_the_model() -> None:
    assert config_for_train(None, {}).output_path == Path("runs/quickstart.h5")
    assert config_for_train(None, {"model": "torchvision:resnet18"}).output_path == Path("runs/quickstart-resnet18.h5")
    assert config_for_train(None, {"model": "models/my net.py:make"}).output_path == Path("runs/quickstart-my-net-make.h5")
    assert config_for_train(None, {"model": "mlp", "name": "mine"}).output_path == Path("runs/mine.h5")
    assert config_for_train(None, {"model": "mlp", "output": "out.h5"}).output_path == Path("out.h5")


def test_older_flat_probe_keys_load_into_their_sections_with_a_hint(tmp_path: Path) -> None:
    old = "probes: {record_every: 5, ics_every: 4, landscape: true, etas: [1, 2], hessian: true, hessian_tol: 1.0e-4, compiled_moments: true}\n"
    with pytest.warns(
        FutureWarning, match=r"probes\.landscape is now probes\.landscape\.enabled.*probes\.hessian_tol is now probes\.hessian\.tol"
    ):
        cfg = load_config(write(tmp_path, old), {"probes.spectrum_k": 3, "probes.spectrum": True})
    p = cfg.probes
    assert (p.moments.every, p.moments.compiled, p.ics.every, p.landscape.enabled, p.landscape.etas) == (5, True, 4, True, (1.0, 2.0))
    assert (p.hessian.enabled, p.hessian.tol, p.spectrum.enabled, p.spectrum.k) == (True, 1e-4, True, 3)
    assert all(new.split(".")[0] in ProbeConfig.__dataclass_fields__ for new in RENAMED.values())
    with pytest.raises(ConfigError, match=r"probes\.ics_every and probes\.ics\.every both given; keep probes\.ics\.every"):
        load_config(write(tmp_path, "probes: {ics_every: 4, ics: {every: 2}}\n"))
    with pytest.warns(RenamedKeyWarning, match="probes.ics_every is now probes.ics.every"):
        assert (
            load_config(write(tmp_path, "probes: {ics_every: 4}\n"), {"probes.ics.every": 2}).probes.ics.every == 2
        )  # flags after the file


def test_a_stored_flat_config_loads_quietly(recwarn: pytest.WarningsRecorder) -> None:
    """Files written by older versions hold every probe key flat; continuing them needs no hint."""
    cfg = load_config_text("name: r\nbn: keep\nfold: true\nprobes: {hessian: true, hessian_every: 0, record_every: 3}\n", "r.h5")
    assert cfg.probes.hessian.every == 3 and not cfg.fold  # that fold did nothing there
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


@pytest.mark.parametrize(
    ("probes", "ics_every", "expected"),
    [
        ("{moments: {every: 7}, hessian: {enabled: true}, spectrum: {enabled: true}, landscape: {enabled: true}}", 0, (7, 7, 7, 0)),
        ("{ics: {every: 4}, hessian: {enabled: true}, spectrum: {enabled: true}, landscape: {enabled: true}}", 0, (4, 4, 4, 4)),
        ("{hessian: {every: 6}, spectrum: {enabled: true}, landscape: {enabled: true}}", 0, (6, 6, 10, 0)),
        ("{hessian: {enabled: true}, spectrum: {enabled: true, every: 9}}", 10, (10, 9, 0, 10)),
        ("{hessian: {enabled: true}, landscape: {enabled: true, every: 2}}", 10, (10, 0, 2, 10)),
    ],
)
def test_schedules_are_resolved_once_when_loading(tmp_path: Path, probes: str, ics_every: int, expected: tuple[int, ...]) -> None:
    """An enabled probe's every: 0 runs with the probe it follows (spectrum: hessian, then ICS, then the
    moments; hessian and landscape: ICS, then the moments), and the config says so."""
    path = write(tmp_path, f"probes: {probes}\n")
    cfg = config_for_ics(path, {}) if ics_every else load_config(path)
    p = cfg.probes
    assert (p.hessian.every, p.spectrum.every, p.landscape.every, p.ics.every) == expected
    assert load_config_text(cfg.to_yaml(), "r.h5").probes == p  # what a run file stores is what runs


def test_fold_needs_bn_strip(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^fold: true folds BN into the layer before it, which only bn: strip does \(bn is keep\)"):
        load_config(write(tmp_path, "fold: true\n"))
    assert load_config(write(tmp_path, "fold: true\nbn: strip\n")).fold
    runs = expand_variants(load_config(write(tmp_path, "fold: true\nvariants: {bn: [keep, strip]}\n")))
    assert [(name, c.fold) for name, c in runs] == [("keep", False), ("strip", True)]
