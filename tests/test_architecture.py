"""The import graph flows one way: config -> model + surgery -> trainer (probes) -> experiment ->
store -> report/export/plot. Checked on the source, so a new import that breaks it fails here."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import bnprobe

PACKAGE = Path(bnprobe.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


#: the report package (its sections included), the findings' quantities and the other views
VIEWS = (
    *sorted(_module_name(p) for package in ("report", "quantities") for p in (PACKAGE / package).rglob("*.py")),
    "bnprobe.export",
    "bnprobe.plot",
    "bnprobe.findings",
    "bnprobe.health",
    "bnprobe.stats",
)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The absolute names of what ``path`` imports: at the top only, or also inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from . import rng` imports a module
    return found


FILES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: _imports(path) for name, path in FILES.items()}


def _internal(module: str) -> set[str]:
    return {m for m in GRAPH[module] if m in FILES and m != module}


def _uses(module: str, prefix: str) -> bool:
    return any(m == prefix or m.startswith(prefix + ".") for m in GRAPH[module])


@pytest.mark.parametrize("view", VIEWS)
def test_views_read_only_the_store(view: str) -> None:
    assert not _uses(view, "torch") and not _uses(view, "bnprobe.probes") and not _uses(view, "h5py")
    assert _internal(view) <= {"bnprobe", "bnprobe.store", "bnprobe.errors", "bnprobe.config", "bnprobe.quadrature", *SCHEMA, *VIEWS}


STORE = {m for m in FILES if m == "bnprobe.store" or m.startswith("bnprobe.store.")}
#: what every part may know: the measurements' table and their config sections (neither imports torch or h5py)
SCHEMA = ("bnprobe.measurements", "bnprobe.probe_config")


@pytest.mark.parametrize("module", SCHEMA)
def test_the_measurements_table_is_free_of_torch_and_h5py(module: str) -> None:
    assert not _uses(module, "torch") and not _uses(module, "h5py") and not _uses(module, "numpy")
    assert _internal(module) <= {"bnprobe", "bnprobe.errors", *SCHEMA}


@pytest.mark.parametrize("module", sorted(STORE))
def test_the_store_knows_no_model(module: str) -> None:
    assert _internal(module) <= {"bnprobe", "bnprobe.errors", "bnprobe.config", *SCHEMA, *STORE}
    assert "torch" not in _imports(FILES[module], top_level_only=True)  # only checkpoints need it


def test_only_the_store_touches_hdf5_and_only_the_cli_typer() -> None:
    assert {m for m in FILES if _uses(m, "h5py")} <= STORE
    assert {m for m in FILES if _uses(m, "typer")} == {"bnprobe.cli", "bnprobe.cli_output"}
    assert {m for m in FILES if "bnprobe.cli" in _internal(m)} == {"bnprobe.__main__"}  # `python -m bnprobe`, `torchrun -m bnprobe`
    assert {m for m in FILES if "bnprobe.cli_output" in _internal(m)} == {"bnprobe.cli"}  # the CLI's printing, its alone


def test_config_is_upstream_of_everything() -> None:
    """The config, with the probes' sections of it (probe_config, kept out of the probes package,
    whose modules need torch) and its reading (config_reading), imports nothing of bnprobe but its
    errors, and no torch."""
    assert _internal("bnprobe.config") <= {"bnprobe.errors", "bnprobe.probe_config", "bnprobe.config_reading"}
    assert _internal("bnprobe.config_reading") <= {"bnprobe.errors", "bnprobe.probe_config"}
    assert not _uses("bnprobe.config", "torch") and not _uses("bnprobe.config_reading", "torch")
    assert _internal("bnprobe.probe_config") <= {"bnprobe.errors"} and not _uses("bnprobe.probe_config", "torch")


def test_models_surgery_and_probes_know_no_trainer_and_no_view() -> None:
    downstream = {"bnprobe.trainer", "bnprobe.experiment", "bnprobe.recorder", "bnprobe.cli", "bnprobe.cli_output", *VIEWS}
    upstream = [
        m
        for m in FILES
        if m.startswith(("bnprobe.probes.", "bnprobe.surgery.")) or m.split(".")[-1] in ("surgery", "layers", "passes", "models", "data")
    ]
    for module in upstream:
        assert not (_internal(module) & downstream), module


def test_no_import_cycle_at_module_level() -> None:
    """Function-level imports are left out: they are how the CLI defers torch."""
    top = {
        name: {m for m in _imports(path, top_level_only=True) if m in FILES and m not in (name, "bnprobe")} for name, path in FILES.items()
    }
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        assert module not in stack, " -> ".join([*stack, module])
        if module not in done:
            for dep in sorted(top[module]):
                visit(dep, [*stack, module])
            done.add(module)

    for module in sorted(top):
        visit(module, [])


def test_the_views_import_neither_torch_nor_the_probes() -> None:
    code = "import sys, bnprobe.report, bnprobe.export, bnprobe.plot; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('bnprobe.probes')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_each_registered_probe_reads_its_own_config_section() -> None:
    """A probe's registry entry names the dataclass of ``cfg.probes.<name>``; every section but the
    moments (recorded by the trainer's hooks, not a registered probe) belongs to one probe."""
    from bnprobe.measurements import MEASUREMENTS
    from bnprobe.probe_config import SECTIONS, ProbeConfig
    from bnprobe.probes import REGISTRY

    defaults = ProbeConfig()
    assert {name: type(getattr(defaults, name)) for name in REGISTRY} == {name: entry.section for name, entry in REGISTRY.items()}
    assert set(SECTIONS) == {*REGISTRY, "moments"}
    assert {m.name: m.config for m in MEASUREMENTS if m.config} == {name: type(getattr(defaults, name)) for name in SECTIONS}


def test_every_measurement_is_complete_and_owns_its_datasets() -> None:
    """Each entry of the measurements table names its datasets inside its own section, a title, a
    hint and (for a probe) a factory that exists; every plot kind and report section is an entry."""
    from bnprobe.measurements import MEASUREMENTS, PLOT_KINDS
    from bnprobe.plot import KINDS
    from bnprobe.report import _SECTIONS
    from bnprobe.store import LAYOUT

    for m in MEASUREMENTS:
        assert m.title and m.what and m.hint and m.layout, m.name
        assert all(spec.section == m.name for spec in m.layout), m.name
        assert (m.config is not None) == bool(m.probe) or m.name == "moments", m.name
    assert {spec.section for spec in LAYOUT} == {"*", *(m.name for m in MEASUREMENTS)}
    assert set(KINDS) == set(PLOT_KINDS) and [s.key for s in _SECTIONS] == [m.name for m in MEASUREMENTS if m.report]


def test_every_report_section_is_a_view_module_with_build_and_draw() -> None:
    """A measurement's table in the report is one module, named in its entry, that builds the
    section's content from a run and draws it; it is a view like the rest of the report."""
    import importlib
    import inspect

    from bnprobe.measurements import MEASUREMENTS

    named = [m.report for m in MEASUREMENTS if m.report]
    assert named and len(set(named)) == len(named)
    for path in named:
        module = importlib.import_module(path)
        assert list(inspect.signature(module.build).parameters) == ["run", "patterns", "stat"], path
        assert list(inspect.signature(module.draw).parameters) == ["page", "report", "having"], path
        assert path in VIEWS, path


def test_every_quantity_a_finding_compares_is_declared_by_its_measurement() -> None:
    """The findings compare exactly the quantities the measurements' ``findings`` modules declare,
    each named after its measurement, in the table's order."""
    import importlib

    from bnprobe.findings import QUANTITIES
    from bnprobe.measurements import MEASUREMENTS

    declared = [(m.name, q) for m in MEASUREMENTS if m.findings for q in importlib.import_module(m.findings).QUANTITIES]
    assert declared and all(q.key.split(".")[0] == name for name, q in declared)
    assert list(QUANTITIES) == [q for _, q in declared]
    assert all(m.findings in VIEWS for m in MEASUREMENTS if m.findings)
