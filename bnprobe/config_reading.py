"""Reading configs: YAML text and files (safe loader, no aliases), ``--set`` assignments, and the
coercion of each value to its field's type with one-line errors that name the key (and, for an
unknown key, the closest valid one). :mod:`bnprobe.config` builds its dataclasses with these.
"""

from __future__ import annotations

import contextlib
import enum
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, closest, did_you_mean, shown, usable_path
from .probe_config import RENAMED

INT64 = 2**63  # integers are stored as HDF5 int64 attributes; seeds go to torch.manual_seed

# Names users carry over from other tools, so that the hint points at ours.
_ALIASES = {
    "learning_rate": "lr",
    "epochs": "steps",
    "iterations": "steps",
    "batch": "batch_size",
    "wd": "weight_decay",
    "optim": "optimizer",
    "batchnorm": "bn",
    "norm": "bn",
}


def key_hint(key: str, valid: Sequence[str], where: str) -> str:
    """The hint for an unknown key: our name for another tool's (``learning_rate``: ``lr``), the new
    name of an older flat probe key close to it (``probes.record_evry``: ``moments.every``), else the closest key."""
    if where == "probes" and (old := closest(key, RENAMED, cutoff=0.8)):
        return did_you_mean(RENAMED[old[0]], [RENAMED[old[0]]])
    alias = closest(key, _ALIASES, cutoff=0.8)
    ours = _ALIASES[alias[0]] if alias else ""
    if ours in valid:
        return did_you_mean(ours, [ours])
    return did_you_mean(key, valid, cutoff=0.4, otherwise=f"; valid keys: {', '.join(valid)}")


def coerce(where: str, value: Any, hint: Any) -> Any:
    """Check and convert one value to its field type; raise ConfigError naming ``where``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        present = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else coerce(where, value, present[0])
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(str(value).lower())
        except ValueError:
            choices = ", ".join(m.value for m in hint)
            raise ConfigError(f"{where}: {shown(value)} is not one of {choices}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {shown(value)}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {shown(value)}")
        if not -INT64 <= value < INT64:
            raise ConfigError(f"{where}: {shown(value)} is out of range (at most {INT64 - 1})")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {shown(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value}")
        return value
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {shown(value)}")
        return str(value)
    if origin is tuple:
        args = typing.get_args(hint)
        items: Sequence[Any] = value if isinstance(value, (list, tuple)) else [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(f"{where}[{i}]", v, args[0]) for i, v in enumerate(items))
        if len(items) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {shown(value)}")
        return tuple(coerce(f"{where}[{i}]", v, a) for i, (v, a) in enumerate(zip(items, args)))
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {shown(value)}")
        bad = next((k for k in value if not isinstance(k, str)), None)
        if bad is not None:  # they become keyword arguments of a model factory or data loader
            raise ConfigError(f"{where}: option names must be strings, got {shown(bad)}")
        return dict(value)
    return value


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw['probes']['layers'] = value`` for ``dotted='probes.layers'`` (CLI overrides)."""
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section")
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """The safe loader without aliases: nine nested lists of nine aliases each ("billion laughs")
    are a few lines of YAML that expand to 9**9 values, and configs have no need for them. A key
    given twice in one mapping is an error: YAML's last-wins would drop the first silently."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]  # types-PyYAML leaves Parser.peek_event unannotated
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not supported in bnprobe configs; write the value out", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):  # other keys are refused as unhashable by the base class
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {shown(key)} is given twice", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """YAML text to Python values with :class:`_Loader`; every failure is a :class:`yaml.YAMLError`
    (nesting too deep for the recursive parser, an integer too long to convert, included)."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    except ValueError as e:  # int() of a number with thousands of digits
        raise yaml.YAMLError(str(e).split(";")[0][:120]) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML config with the safe loader; one-line errors for missing or invalid files."""
    p = usable_path(path, ConfigError)
    if p.is_dir():
        raise ConfigError(f"config {p} is a directory; give a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    if p.suffix in (".h5", ".hdf5"):
        raise ConfigError(f"{p} is a run file, not a config; to continue it: bnprobe train --resume {p}")
    try:
        raw = parse_yaml(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from e
    except UnicodeDecodeError:
        raise ConfigError(f"config {p} is not a UTF-8 text file; give a YAML config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"invalid YAML in {p}{where}: {problem}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of keys to values at the top level")
    return raw


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``["probes.hessian_tol=1e-4", "variants.lr=[0.1, 0.01]"]`` -> dotted keys to YAML-parsed values:
    the CLI's ``--set``, which reaches every config key, including those without a flag of their own."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise ConfigError(f"--set needs KEY=VALUE (e.g. --set probes.hessian_tol=1e-4), got {shown(item)}")
        try:
            out[key.strip()] = parse_yaml(text)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"--set {key.strip()[:60]}: {shown(text)} is not a valid YAML value ({problem})") from None
    return out
