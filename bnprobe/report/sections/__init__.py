"""The report's sections, one module per measurement with a table of its own in ``bnprobe report``.

A section module (named by the ``report`` field of its entry in
:data:`bnprobe.measurements.MEASUREMENTS`) holds the TypedDict of its content and two functions:
``build(run, patterns, stat)`` reads a run through :mod:`bnprobe.store` and returns that content,
JSON-ready, or ``None`` when the run did not record it; ``draw(page, report, having)`` prints it
on a :class:`~bnprobe.report.page.Page` for the ``(label, content)`` of every run that has it.
:mod:`~bnprobe.report.content` and :mod:`~bnprobe.report.render` gather them from the table.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from ...measurements import MEASUREMENTS, Measurement


def section_modules() -> list[tuple[Measurement, ModuleType]]:
    """Each measurement with a report section and its module, in the table's order.

    Imported when first asked for rather than with this package: the modules build on
    :mod:`~bnprobe.report.content`, which asks for them.
    """
    return [(m, import_module(m.report)) for m in MEASUREMENTS if m.report]
