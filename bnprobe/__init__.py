"""bnprobe: what batch normalization does to your network, measured.

The public API. Names are imported on first use, so that ``bnprobe --help`` and
``bnprobe report`` start without importing torch; type checkers see the real imports below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import load_config
    from .data import load_data
    from .experiment import run_experiment
    from .models import build_model, list_models
    from .passes import leave_no_trace
    from .probes.hessian import top_hessian_eigenvalue
    from .probes.ics import gradient_shift
    from .probes.landscape import landscape
    from .probes.moments import moment_stats
    from .probes.spectrum import hessian_trace, spectral_density, top_eigenvalues
    from .recorder import Recorder
    from .store.reader import read_file
    from .surgery import apply_bn

__version__ = "0.1.0"

_EXPORTS = {
    "build_model": "bnprobe.models",
    "list_models": "bnprobe.models",
    "load_data": "bnprobe.data",
    "load_config": "bnprobe.config",
    "Recorder": "bnprobe.recorder",
    "apply_bn": "bnprobe.surgery",
    "leave_no_trace": "bnprobe.passes",
    "gradient_shift": "bnprobe.probes.ics",
    "landscape": "bnprobe.probes.landscape",
    "top_hessian_eigenvalue": "bnprobe.probes.hessian",
    "moment_stats": "bnprobe.probes.moments",
    "top_eigenvalues": "bnprobe.probes.spectrum",
    "hessian_trace": "bnprobe.probes.spectrum",
    "spectral_density": "bnprobe.probes.spectrum",
    "run_experiment": "bnprobe.experiment",
    "read_file": "bnprobe.store.reader",
}
__all__ = [
    "Recorder",
    "__version__",
    "apply_bn",
    "build_model",
    "gradient_shift",
    "hessian_trace",
    "landscape",
    "leave_no_trace",
    "list_models",
    "load_config",
    "load_data",
    "moment_stats",
    "read_file",
    "run_experiment",
    "spectral_density",
    "top_eigenvalues",
    "top_hessian_eigenvalue",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bnprobe' has no attribute {name!r}")
