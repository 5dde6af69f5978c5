"""Experiment configuration: YAML (safe loader) into frozen, validated dataclasses.

Precedence: defaults < config file < CLI flags. Unknown keys are errors that name the closest
valid key. ``variants`` lists values of run options (``bn: [keep, insert]``, ``lr: [0.1, 0.01]``);
their product expands into runs, in one file. Runs that share a seed share data order and initial
weights; ``seed: [0, 1, 2]`` makes replicates, which reports average with a 95% interval.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import re
import string
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config_reading import INT64, coerce, key_hint, parse_assignments, parse_yaml, read_yaml, set_dotted
from .errors import ConfigError, shown
from .probe_config import (
    LAYER_KINDS,
    HessianBnMode,
    IcsMethod,
    LayerKind,
    ProbeConfig,
    layer_patterns,
    moved_into_sections,
    renamed,
    resolve_schedules,
)

# Their home is probe_config (the probes' sections) or config_reading (YAML and coercion); they are read from here too.
__all__ = [
    "LAYER_KINDS",
    "HessianBnMode",
    "IcsMethod",
    "LayerKind",
    "ProbeConfig",
    "layer_patterns",
    "parse_assignments",
    "parse_yaml",
    "read_yaml",
    "set_dotted",
]


class BnMode(str, enum.Enum):
    KEEP = "keep"
    INSERT = "insert"
    STRIP = "strip"
    NOISY = "noisy"


class BnTargets(str, enum.Enum):
    AUTO = "auto"
    CONV = "conv"
    LINEAR = "linear"
    ALL = "all"


class OptimizerName(str, enum.Enum):
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"


class DistBackend(str, enum.Enum):
    """torch.distributed's backend under torchrun; ``auto`` is nccl on CUDA, gloo elsewhere."""

    AUTO = "auto"
    GLOO = "gloo"
    NCCL = "nccl"


@dataclass(frozen=True)
class NoiseConfig:
    """Noisy BN recipe (Santurkar et al. Sec. 2.1): per step and layer mu ~ U(mu_range),
    sigma ~ U(sigma_range); per channel m ~ U(mu - mean_spread, mu + mean_spread), s ~ N(sigma, scale_std)."""

    mu_range: tuple[float, float] = (-0.5, 0.5)
    sigma_range: tuple[float, float] = (1.0, 1.25)
    mean_spread: float = 0.1
    scale_std: float = 0.1


@dataclass(frozen=True)
class Config:
    """One run's full configuration; a config with ``variants`` expands into several of these."""

    name: str = "run"
    model: str = "vgg"
    model_options: Mapping[str, Any] = field(default_factory=dict)
    data: str = "synthetic:cifar10"
    data_options: Mapping[str, Any] = field(default_factory=dict)
    bn: BnMode = BnMode.KEEP
    bn_targets: BnTargets = BnTargets.AUTO
    keep_bias: bool = False
    fold: bool = False
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    optimizer: OptimizerName = OptimizerName.SGD
    lr: float = 0.05
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    steps: int = 200
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    sync_bn: bool = False  # under torchrun: BN layers become SyncBatchNorm (statistics of the global batch)
    dist_backend: DistBackend = DistBackend.AUTO
    dist_timeout: float = 300.0  # seconds a collective waits for the other processes before the run fails
    output: str = "runs/{name}.h5"
    flush_every: int = 500
    flush_seconds: float = 5.0
    checkpoint_every: int = 0
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    variants: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def output_path(self) -> Path:
        return Path(self.output.format(name=self.name))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (enums as strings, tuples as lists), as YAML would hold it."""
        return {key: _plain(value) for key, value in dataclasses.asdict(self).items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


VARIANT_KEYS = ("bn", "seed", "lr", "optimizer", "momentum", "weight_decay", "batch_size", "bn_targets", "keep_bias", "nesterov", "model")


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


MAX_VARIANTS = 100  # runs in one experiment: each one's model is built up front
_DEVICE = re.compile(r"auto|(cpu|cuda|mps)(:\d+)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _build(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys to values, got {shown(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown key {shown(path)}{key_hint(str(key)[:100], names, where)}")
        if cls is ProbeConfig and key == "layers" and isinstance(value, str):
            value = layer_patterns(value)  # "features.*,fc" holds two globs, as on report's --layers
        if dataclasses.is_dataclass(hints[key]):  # a section: noise, probes, each probe's
            kwargs[key] = _build(hints[key], value or {}, path)
        elif key == "variants":
            kwargs[key] = _variants(value or {})
        elif not where and key in VARIANT_KEYS and isinstance(value, list) and typing.get_origin(hints[key]) is not tuple:
            raise ConfigError(f"{key}: one value here; to run several, list them under variants (variants: {{{key}: {_flow(value)}}})")
        else:
            kwargs[key] = coerce(path, value, hints[key])
    return cls(**kwargs)


def _flow(values: list[Any]) -> str:
    return "[" + ", ".join(str(v) if len(shown(v)) < 40 else "..." for v in values[:6]) + (", ...]" if len(values) > 6 else "]")


def _variants(raw: Any) -> dict[str, tuple[Any, ...]]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"variants: expected a mapping like {{bn: [keep, insert]}}, got {shown(raw)}")
    hints = typing.get_type_hints(Config)
    out: dict[str, tuple[Any, ...]] = {}
    for key, values in raw.items():
        if key not in VARIANT_KEYS:
            raise ConfigError(f"variants: cannot vary {shown(key)}{key_hint(str(key)[:100], VARIANT_KEYS, 'variants')}")
        items = values if isinstance(values, (list, tuple)) else [values]
        if not items:
            raise ConfigError(f"variants.{key}: give at least one value")
        out[key] = tuple(coerce(f"variants.{key}", v, hints[key]) for v in items)
        if math.prod(len(v) for v in out.values()) > MAX_VARIANTS:
            raise ConfigError(
                f"variants: more than {MAX_VARIANTS} runs (every variant's model is built before the first step); split the experiment"
            )
        twice = next((v for i, v in enumerate(out[key]) if v in out[key][:i]), None)
        if twice is not None:  # two runs of one name would share one group in the file
            raise ConfigError(f"variants.{key} lists {_plain(twice)} twice")
    return out


def _placeholders_ok(template: str) -> bool:
    """Only a bare ``{name}``: ``{name.attr}``, ``{name[0]}`` or a format spec (``{name:>999999999}``)
    would make a file name out of whatever Python evaluates."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        return False
    return all(f is None or (f == "name" and not spec and conv is None) for _, f, spec, conv in parts)


def _ordered(pair: tuple[float, float]) -> bool:
    return pair[0] <= pair[1]


def _validate(cfg: Config) -> Config:
    """Checks across a config's keys; each section checks its own values when built."""
    checks = [
        (cfg.lr > 0, "lr must be positive"),
        (cfg.steps > 0, "steps must be at least 1"),
        (cfg.batch_size > 0, "batch_size must be at least 1"),
        (cfg.momentum >= 0, "momentum must be >= 0"),
        (cfg.weight_decay >= 0, "weight_decay must be >= 0"),
        (cfg.flush_every > 0, "flush_every must be at least 1"),
        (cfg.flush_seconds > 0, "flush_seconds must be positive"),
        (cfg.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0: at the end only)"),
        (not cfg.nesterov or cfg.momentum > 0, "nesterov needs momentum > 0"),
        (
            not cfg.fold or BnMode.STRIP in cfg.variants.get("bn", (cfg.bn,)),
            f"fold: true folds BN into the layer before it, which only bn: strip does (bn is {_plain(cfg.bn)}); drop fold or use bn: strip",
        ),
        (cfg.dist_timeout > 0, "dist_timeout must be positive (seconds)"),
        (0 <= cfg.seed < INT64, f"seed must be between 0 and {INT64 - 1}"),
        (_DEVICE.fullmatch(cfg.device) is not None, f"device must be auto, cpu, cuda[:N] or mps, not {shown(cfg.device)}"),
        (
            bool(cfg.name) and "/" not in cfg.name and not _CONTROL.search(cfg.name),
            "name must be non-empty and hold no '/' or control characters",
        ),
        (not _CONTROL.search(cfg.output), "output must hold no control characters"),
        (
            not set(cfg.model_options) & {"spec", "num_classes", "input_shape"},
            "model_options cannot set spec, num_classes or input_shape (the model is `model`; the data sets the others)",
        ),
        (not set(cfg.data_options) & {"spec", "seed"}, "data_options cannot set spec or seed (they are `data` and `seed`)"),
        (
            _ordered(cfg.noise.mu_range) and _ordered(cfg.noise.sigma_range),
            "noise.mu_range and noise.sigma_range must be [low, high] with low <= high",
        ),
        (cfg.noise.mean_spread >= 0 and cfg.noise.scale_std >= 0, "noise.mean_spread and noise.scale_std must be >= 0"),
        (_placeholders_ok(cfg.output), f"output {shown(cfg.output)}: the only placeholder is {{name}}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg


def _from_file(path: str | Path) -> dict[str, Any]:
    """A config file's keys; ``name`` defaults to the file's stem."""
    raw = read_yaml(path)
    raw.setdefault("name", Path(path).stem)
    return raw


class RenamedKeyWarning(FutureWarning):
    """A config used an older key name; it was read under its new one, which the message names."""


def _moved(raw: dict[str, Any], overrides: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Older flat probe keys in ``raw`` (``probes: {ics_every: 5}``) and ``overrides`` (``probes.ics_every``)
    under their new names, the overrides returned; and the (old, new) keys that moved."""
    moved: list[tuple[str, str]] = []
    if isinstance(raw.get("probes"), Mapping):
        raw["probes"], moved = moved_into_sections(raw["probes"])
    current: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        new = f"probes.{renamed(rest, value)}" if head == "probes" and renamed(rest, value) else key
        if new != key:
            moved.append((key, new))
        current[new] = value
    return current, moved


_OPTION_KEYS = ("model_options.", "data_options.")


def _resolved(raw: dict[str, Any], overrides: Mapping[str, Any], ics_every: int = 0, stored: bool = False) -> Config:
    """``raw`` with ``overrides`` (dotted keys; None means not given, except under ``model_options`` and
    ``data_options``, where it is a value the factory gets: ``weights_backbone=None``) applied, built, its
    schedules resolved (ICS, when off, at ``ics_every``) and validated. A ``stored`` config (one a run
    file holds) is read quietly, older key names included, and a ``fold`` its bn never used is dropped."""
    kept = {key: value for key, value in overrides.items() if value is not None or key.startswith(_OPTION_KEYS)}
    given, moved = _moved(raw, kept)
    for key, value in given.items():
        set_dotted(raw, key, value)
    cfg = _build(Config, raw, "")
    cfg = dataclasses.replace(cfg, probes=resolve_schedules(cfg.probes, ics_every))
    if stored and "fold" not in given and BnMode.STRIP not in cfg.variants.get("bn", (cfg.bn,)):
        cfg = dataclasses.replace(cfg, fold=False)  # older versions accepted fold with any bn, and ignored it
    cfg = _validate(cfg)
    if moved and not stored:  # once the config holds: an error is the one line a broken config gets
        names = ", ".join(f"{old} is now {new}" for old, new in dict(moved).items())
        warnings.warn(f"older config keys, read under their new names: {names}", RenamedKeyWarning, stacklevel=3)
    return cfg


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file, then ``overrides`` (dotted keys, the CLI's flags); validated."""
    return _resolved(_from_file(path) if path is not None else {}, overrides or {})


def load_config_text(text: object, source: str, overrides: Mapping[str, Any] | None = None, ics_every: int = 0) -> Config:
    """A config stored as YAML text (the ``config`` attribute of a bnprobe file), then ``overrides``;
    ICS, when off, at ``ics_every``."""
    if not isinstance(text, str):
        raise ConfigError(f"{source} holds no config")
    try:
        raw = parse_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"the config stored in {source} is not valid YAML") from e
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source} holds no config")
    return _resolved(raw, overrides or {}, ics_every, stored=True)


# ----------------------------------------------------------------------------- what the commands run

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "quickstart.yaml"  # `bnprobe train` with no config
MEASURE_ICS_EVERY = 10  # measure-ics measures ICS: every this many steps when the config has it off
FIXED_WHEN_CONTINUING = ("model", "model_options", "data", "data_options", "bn", "variants", "seed")  # what a checkpoint's weights fit


def bn_overrides(modes: Sequence[str] | None) -> dict[str, Any]:
    """``--bn``: one mode sets ``bn``; several run as variants (``variants.bn``)."""
    if not modes:
        return {}
    return {"bn": modes[0]} if len(modes) == 1 else {"variants.bn": list(modes)}


def _fitting_options(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides``, preceded by empty ``model_options`` / ``data_options`` where they change the file's
    model or data: options written for one model don't fit another (``--set model_options.X=...`` still applies)."""
    reset: dict[str, Any] = {
        f"{key}_options": {}
        for key in ("model", "data")
        if key in overrides and overrides[key] != raw.get(key) and f"{key}_options" not in overrides
    }
    return reset | dict(overrides)


def config_for_train(path: str | Path | None, overrides: Mapping[str, Any], ics_every: int = 0) -> Config:
    """``bnprobe train``'s config: ``path`` (default: the built-in quickstart) with ``overrides``. A new
    model or data drops the file's options for the old one; a single ``bn`` drops the file's bn variants.
    ICS, when off, is measured every ``ics_every`` steps (0: not)."""
    raw = _from_file(DEFAULT_CONFIG if path is None else path)
    cfg = _resolved(raw, _fitting_options(raw, overrides), ics_every)
    if overrides.get("bn") and "variants" not in overrides and cfg.variants.get("bn"):
        cfg = dataclasses.replace(cfg, variants={k: v for k, v in cfg.variants.items() if k != "bn"})
    if "model" in overrides and "name" not in overrides:  # runs/quickstart.h5 would hold another model's runs
        cfg = dataclasses.replace(cfg, name=f"{cfg.name}-{model_slug(cfg.model)}")
    return cfg


def model_slug(spec: str) -> str:
    """A model spec as a file-name part: ``torchvision:resnet18`` -> ``resnet18``,
    ``models/net.py:make`` -> ``net-make``, ``pkg.mod:factory`` -> ``pkg.mod-factory``."""
    source, _, factory = spec.rpartition(":")
    if source in ("", "torchvision"):
        return re.sub(r"[^\w.-]+", "-", factory or spec).strip("-") or "model"
    return re.sub(r"[^\w.-]+", "-", f"{Path(source).stem if source.endswith('.py') else source}-{factory}").strip("-")


def config_for_ics(path: str | Path | None, overrides: Mapping[str, Any]) -> Config:
    """``bnprobe measure-ics CONFIG``: the config ``train`` would run, with ICS measured."""
    return config_for_train(path, overrides, MEASURE_ICS_EVERY)


def check_continuable(overrides: Mapping[str, Any], source: str, labels: Mapping[str, str] | None = None) -> None:
    """Refuse overrides of what a run's checkpoint fits (:data:`FIXED_WHEN_CONTINUING`); ``labels``
    names each key as the user gave it (``--model``, ``--set seed``)."""
    fixed = [(labels or {}).get(key, key) for key in overrides if key.split(".")[0] in FIXED_WHEN_CONTINUING]
    if fixed:
        raise ConfigError(
            f"{' and '.join(dict.fromkeys(fixed))} cannot change when continuing {source}: its weights fit its own model and data (give a config instead)"
        )


def config_for_measure(text: object, source: str, overrides: Mapping[str, Any]) -> tuple[Config, int | None]:
    """``bnprobe measure-ics RUN.h5``: the config stored in the run file (``text``) with ``overrides`` and
    ICS measured, and how many further steps each run goes on for (``steps``; None: as many as it ran)."""
    check_continuable(overrides, source)
    rest = dict(overrides)
    given = rest.pop("steps", None)
    further: int | None = None if given is None else coerce("steps", given, int)
    if further is not None and further < 1:
        raise ConfigError("steps must be at least 1 (the number of further steps)")
    return load_config_text(text, source, rest, MEASURE_ICS_EVERY), further


def variant_name(choice: Mapping[str, Any]) -> str:
    """``bn=insert, lr=0.1`` -> ``insert-lr0.1``: the bn value bare, other keys prefixed. A model
    file's path (``./m.py:make``) is named as in the file name, ``m-make``: a run's name holds no '/'."""
    parts = []
    for key, value in choice.items():
        text = str(_plain(value))
        if key == "model" and ("/" in text or "\\" in text):
            text = model_slug(text)
        parts.append(text if key == "bn" else f"{key}{text}")
    return "-".join(parts) if parts else "default"


def expand_variants(cfg: Config) -> list[tuple[str, Config]]:
    """The runs a config stands for: the product of its ``variants`` lists, each with its name."""
    if not cfg.variants:
        return [(_plain(cfg.bn), cfg)]
    keys = list(cfg.variants)
    runs = []
    for values in itertools.product(*(cfg.variants[k] for k in keys)):
        choice = dict(zip(keys, values))
        fold = cfg.fold and choice.get("bn", cfg.bn) is BnMode.STRIP  # folding is for the strip runs among the variants
        runs.append((variant_name(choice), _validate(dataclasses.replace(cfg, **choice, variants={}, fold=fold))))
    names = [name for name, _ in runs]
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:  # checked before the first variant trains: both would write to one group of the file
        raise ConfigError(
            f"variants: two runs would be named {shown(twice)} (model files of one name and factory); rename one of the files"
        )
    return runs
