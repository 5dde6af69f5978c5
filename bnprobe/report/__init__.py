"""``bnprobe report``: what a run recorded, as JSON-ready content and as rich tables.

:mod:`.content` builds the plain data (:func:`build_report`, the ``--json`` output);
:mod:`.render` prints it on a console (:func:`render_report`); each measurement with a table of
its own has a module in :mod:`.sections` that does both for it.
"""

from __future__ import annotations

from .content import RECORD_HINTS, STAT_CHOICES, FileReport, Number, Plain, Report, RunReport, Summary, align_layers, build_report, num
from .page import SPARK_BLOCKS, fmt, sparkline
from .render import _SECTIONS as _SECTIONS  # the section order, which the tests check against the store's
from .render import render_report
from .sections.hessian import Hessian
from .sections.ics import Ics, IcsLayer
from .sections.landscape import Landscape
from .sections.moments import SERIES_POINTS, MomentLayer, Moments
from .sections.spectrum import Spectrum

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
