"""``bnprobe report``: what a run recorded, as JSON-ready content and as rich tables.

:mod:`.content` builds the plain data (:func:`build_report`, the ``--json`` output);
:mod:`.render` prints it on a console (:func:`render_report`).
"""

from __future__ import annotations

from .content import (
    RECORD_HINTS,
    SERIES_POINTS,
    STAT_CHOICES,
    FileReport,
    Hessian,
    Ics,
    IcsLayer,
    Landscape,
    MomentLayer,
    Moments,
    Number,
    Plain,
    Report,
    RunReport,
    Spectrum,
    Summary,
    align_layers,
    build_report,
    num,
)
from .render import _SECTIONS as _SECTIONS  # the section order, which the tests check against the store's
from .render import SPARK_BLOCKS, fmt, render_report, sparkline

__all__ = [
    "RECORD_HINTS",
    "SERIES_POINTS",
    "SPARK_BLOCKS",
    "STAT_CHOICES",
    "FileReport",
    "Hessian",
    "Ics",
    "IcsLayer",
    "Landscape",
    "MomentLayer",
    "Moments",
    "Number",
    "Plain",
    "Report",
    "RunReport",
    "Spectrum",
    "Summary",
    "align_layers",
    "build_report",
    "fmt",
    "num",
    "render_report",
    "sparkline",
]
