"""bnprobe: what batch normalization does to your network, measured.

The public API (DESIGN 1.7); names are imported on first use so that ``bnprobe --help`` starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "build_model": "bnprobe.models",
    "list_models": "bnprobe.models",
    "load_data": "bnprobe.data",
    "load_config": "bnprobe.config",
    "Recorder": "bnprobe.recorder",
    "apply_bn": "bnprobe.surgery",
    "gradient_shift": "bnprobe.probes.ics",
    "landscape": "bnprobe.probes.landscape",
    "top_hessian_eigenvalue": "bnprobe.probes.hessian",
    "moment_stats": "bnprobe.probes.moments",
    "run_experiment": "bnprobe.trainer",
    "read_file": "bnprobe.store",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bnprobe' has no attribute {name!r}")
