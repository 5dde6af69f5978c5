"""Model registry and loaders: built-in models, ``torchvision:NAME``, ``timm:NAME`` and user factories.

Built-ins adapt to the data's input shape and number of outputs, so one name works on every
data source. User models are ``path/to/file.py:factory`` or ``package.module:factory``; the file
is executed only because the user named it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import importlib.util
import inspect
import io
import itertools
import math
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .errors import BnprobeError, ModelError, described, did_you_mean, first_line, shown

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str | None = None) -> Callable[[ModelFactory], ModelFactory]:
    """Register a built-in factory ``f(num_classes, input_shape, **options) -> nn.Module``."""

    def wrap(fn: ModelFactory) -> ModelFactory:
        key = (name or fn.__name__).lower()
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    return wrap


def _natural_key(name: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_models(include: str = "*", exclude: str | None = None, torchvision_models: bool = False) -> list[str]:
    """Built-in model names (and ``torchvision:NAME`` ones when asked) matching the globs."""
    names = list(_REGISTRY)
    if torchvision_models:
        import torchvision

        names += [f"torchvision:{n}" for n in torchvision.models.list_models()]
    picked = [n for n in names if fnmatch.fnmatch(n, include) and not (exclude and fnmatch.fnmatch(n, exclude))]
    return sorted(picked, key=_natural_key)


# ----------------------------------------------------------------------------- built-ins


def glorot_init(model: nn.Module) -> nn.Module:
    """Glorot (Xavier) uniform weights and zero biases, as in Santurkar et al.'s VGG runs."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


VGG11_LAYOUT: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG-style CNN: ``features`` (conv/ReLU/max-pool), then a linear ``classifier``."""

    def __init__(self, features: nn.Sequential, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(torch.flatten(self.features(x), 1))
        return logits


@register_model("vgg")
def vgg(num_classes: int, input_shape: tuple[int, ...], width: float = 1.0) -> nn.Module:
    """VGG-11 for small images: 8 conv layers (3x3, ReLU, max-pool), then one linear classifier.

    ``width`` scales the channel counts (0.5 is the half-width VGG the benchmarks use). No BN:
    ``--bn insert`` adds it where torchvision's ``vgg11_bn`` has it. Glorot init as in the paper.
    """
    if not width > 0:
        raise ModelError(f"vgg: width must be positive, got {shown(width)}")
    channels, height, w = _image_shape(input_shape, "vgg")
    layers: list[nn.Module] = []
    for item in VGG11_LAYOUT:
        if item == "M":
            if min(height, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                height, w = height // 2, w // 2
        else:
            out = max(1, int(int(item) * width))
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(inplace=True)]
            channels = out
    return glorot_init(VGG(nn.Sequential(*layers), nn.Linear(channels * height * w, num_classes)))


@register_model("mlp")
def mlp(num_classes: int, input_shape: tuple[int, ...], hidden: int = 100, depth: int = 3, activation: str = "sigmoid") -> nn.Module:
    """Ioffe & Szegedy's MNIST net: ``depth`` hidden layers of ``hidden`` sigmoid units."""
    acts: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
    if activation not in acts:
        raise ModelError(f"mlp: unknown activation {activation!r}; choose from {', '.join(acts)}")
    _at_least("mlp", 1, hidden=hidden)
    _at_least("mlp", 0, depth=depth)
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), acts[activation]()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model("dln")
def dln(num_classes: int, input_shape: tuple[int, ...], depth: int = 25, width: int = 10) -> nn.Module:
    """Deep linear network (Santurkar et al.): ``depth`` bias-free linear layers, no non-linearity.

    The first layer maps the input to ``width`` and the last maps ``width`` to ``num_classes``
    (the regression target's dimension), so the product W_depth...W_1 is the learned matrix.
    Glorot init: with PyTorch's default init the product of 25 layers is ~1e-6 and nothing trains.
    """
    _at_least("dln", 1, depth=depth, width=width)
    dims = [math.prod(input_shape)] + [width] * (depth - 1) + [num_classes]
    return glorot_init(nn.Sequential(nn.Flatten(), *[nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(dims)]))


@register_model("video_cnn")
def video_cnn(num_classes: int, input_shape: tuple[int, ...], width: int = 8) -> nn.Module:
    """A small 3-D conv net for clips ``(channels, frames, height, width)``: three 3x3x3 conv/ReLU
    blocks (``width``, 2x, 4x channels; pooled over space, then over time and space), a global
    *max* pool, and a linear classifier. No BN: ``--bn insert`` adds BatchNorm3d after each conv.

    The max pool is what lets it learn a small object moving over a large background in a few
    hundred steps, with BN or without: an average over the clip buries the object's motion
    features under the background's, and this net with one stayed at chance on ``synthetic:clips``.
    He init, as the blocks end in ReLU.
    """
    _at_least("video_cnn", 1, width=width)
    if len(input_shape) != 4:
        raise ModelError(f"video_cnn needs clips (channels, frames, height, width); the data has shape {tuple(input_shape)}")
    widths = (input_shape[0], width, 2 * width, 4 * width)
    pools: list[nn.Module] = [nn.MaxPool3d((1, 2, 2), ceil_mode=True), nn.MaxPool3d(2, ceil_mode=True), nn.AdaptiveMaxPool3d(1)]
    layers: list[nn.Module] = []
    for c_in, c_out, pool in zip(widths, widths[1:], pools):
        conv = nn.Conv3d(c_in, c_out, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        layers += [conv, nn.ReLU(inplace=True), pool]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(widths[-1], num_classes))


def _at_least(model: str, minimum: int, **sizes: object) -> None:
    """Layer counts and widths below ``minimum`` (``depth: -3``, ``hidden: 0``) would build layers
    without units, or none at all, that fail somewhere in training instead of here."""
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ModelError(f"{model}: {key} must be an integer >= {minimum}, got {shown(value)}")


def _image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ModelError(f"{model} needs image input (channels, height, width); the data has shape {tuple(input_shape)}")
    c, h, w = input_shape
    return c, h, w


# ----------------------------------------------------------------------------- loaders


@contextlib.contextmanager
def _user_code(what: str) -> Iterator[None]:
    """Run the user's code (importing a model file, calling its factory): a ``sys.exit`` there
    (``argparse`` at import, a factory's ``sys.exit("no GPU found")``) is a :class:`ModelError`
    naming ``what`` and what it said, not the end of bnprobe with the user's usage line or exit
    status. What it writes to stderr meanwhile is held, and passed on unless it exited."""
    held = io.StringIO()
    exited: SystemExit | None = None
    try:
        with contextlib.redirect_stderr(held):
            yield
    except SystemExit as e:
        exited = e
    finally:
        if exited is None:
            sys.stderr.write(held.getvalue())
    if exited is not None:
        said = [line for line in held.getvalue().splitlines() if line.strip()]
        code = exited.code
        reason = said[-1] if said else code if isinstance(code, str) else f"exit status {0 if code is None else code}"
        raise ModelError(f"{what} called sys.exit: {reason}") from exited


def build_model(spec: str, num_classes: int, input_shape: tuple[int, ...], **options: Any) -> nn.Module:
    """Build a model from a spec: a built-in name, ``torchvision:NAME``, ``timm:NAME``, or ``file.py:factory`` / ``pkg.mod:factory``.

    A factory that raises (bad options, a bug in a user's file) is a one-line :class:`ModelError`
    naming the spec; ``--debug`` shows the traceback.
    """
    try:
        with _user_code(f"model {spec!r}"):
            return _build(spec, num_classes, input_shape, options)
    except BnprobeError:
        raise
    except Exception as e:  # whatever the factory raised, said in one line
        raise ModelError(f"building model {spec!r} failed: {described(e)} (--debug shows where)") from e


def _build(spec: str, num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any]) -> nn.Module:
    input_shape = tuple(int(d) for d in input_shape)
    model: object
    if spec.startswith("torchvision:"):
        model = _torchvision_model(spec.split(":", 1)[1], num_classes, input_shape, options)
    elif spec.startswith("timm:"):
        model = _timm_model(spec.split(":", 1)[1], num_classes, input_shape, options)
    elif ":" in spec:
        model = _user_model(spec, num_classes, input_shape, options)
    else:
        key = spec.lower()
        if key not in _REGISTRY:
            raise ModelError(
                _unknown(spec, list(_REGISTRY)) + " (or use torchvision:NAME, timm:NAME, file.py:factory, package.module:factory)"
            )
        factory = _REGISTRY[key]
        _check_options(spec, factory, options)
        model = factory(num_classes, input_shape, **options)
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _unknown(name: str, choices: list[str]) -> str:
    available = f"; available: {', '.join(sorted(choices, key=_natural_key)[:12])}"
    return f"unknown model {shown(name)}{did_you_mean(name.lower(), choices, n=3, cutoff=0.5, otherwise=available)}"


def _check_options(spec: str, factory: ModelFactory, options: dict[str, Any]) -> None:
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for key in options:
        if key not in params or key in ("num_classes", "input_shape"):
            valid = [k for k in params if k not in ("num_classes", "input_shape")]
            hint = did_you_mean(key, valid, otherwise=f"; valid: {', '.join(valid) or 'none'}")
            raise ModelError(f"model {spec!r} has no option {key!r}{hint}")


def _torchvision_model(name: str, num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any]) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if name.lower() not in available:
        raise ModelError(_unknown(name, available).replace("unknown model", "unknown torchvision model"))
    weights_file = options.pop("weights_file", None)
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes, **options}
    if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name.lower())).parameters:
        kwargs.setdefault("weights_backbone", None)  # segmentation and detection builders: random init throughout
    if name.lower().startswith(("inception", "googlenet")):
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    try:
        model: nn.Module = torchvision.models.get_model(name.lower(), **kwargs)
    except TypeError as e:
        raise _type_error(f"torchvision:{name}", torchvision.models.get_model_builder(name.lower()), e) from e
    if weights_file:
        load_weights(model, weights_file)
    return model


def _timm_model(name: str, num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any]) -> nn.Module:
    """``timm.create_model(NAME)``, randomly initialised; image data with other than 3 channels sets ``in_chans``."""
    try:
        import timm
    except ImportError:
        raise ModelError(f"timm:{name} needs timm, which is not installed (pip install timm)") from None
    if not timm.is_model(name):
        raise ModelError(_unknown(name, timm.list_models()).replace("unknown model", "unknown timm model"))
    weights_file = options.pop("weights_file", None)
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": num_classes, **options}
    if len(input_shape) == 3 and input_shape[0] != 3:
        kwargs.setdefault("in_chans", input_shape[0])
    try:
        model: nn.Module = timm.create_model(name, **kwargs)
    except TypeError as e:
        raise ModelError(f"timm:{name}: {e}") from e
    if weights_file:
        load_weights(model, weights_file)
    return model


def refuse_detection(model: nn.Module, spec: str) -> None:
    """A torchvision detection model trains on box targets and returns a dict of losses (in eval
    mode, a list of boxes), which bnprobe's commands, made for one tensor in and one out, cannot
    give or take. The Python API can, through a module that wraps it and returns a scalar loss."""
    if "torchvision.models.detection" not in sys.modules:
        return
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.ssd import SSD

    if isinstance(model, (GeneralizedRCNN, RetinaNet, FCOS, SSD)):
        raise ModelError(
            f"{spec} is a detection model ({type(model).__name__}): it trains on box targets and returns a dict of losses, "
            'which bnprobe\'s commands cannot give or take; use the Python API with a module that wraps it and returns a scalar loss (docs/api.md, "Detection models")'
        )


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict (never from a hub) with ``weights_only=True``. A file that holds
    more than tensors (a pickle with code) is refused in one line: torch's own warnings and its
    advice to load with ``weights_only=False`` are not shown."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"weights file {p} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(p, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except pickle.UnpicklingError as e:
        raise ModelError(
            f"cannot load weights from {p}: not a state dict that torch loads with weights_only=True (it may hold code)"
        ) from e
    except Exception as e:  # any failure here is a bad file, reported in one line
        raise ModelError(f"cannot load weights from {p}: {first_line(e)}") from e


def _user_model(spec: str, num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any]) -> object:
    """What the user's factory returns (checked to be a module by the caller), given only the arguments it takes."""
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _load_file(Path(target))
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelError(f"cannot import {target!r} for model {spec!r}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ModelError(f"{target} has no factory {attr!r}{did_you_mean(attr, names)}")
    kwargs = dict(options)
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if "num_classes" in params or takes_any:
        kwargs.setdefault("num_classes", num_classes)
    if "input_shape" in params:  # not through **kwargs: torchvision-style builders would reject it
        kwargs.setdefault("input_shape", input_shape)
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise _type_error(spec, factory, e) from e


def _type_error(spec: str, builder: Callable[..., object], error: TypeError) -> ModelError:
    """A builder's TypeError in one line. One that passes ``num_classes`` on through ``**kwargs`` to
    a model without classes (torchvision's optical-flow RAFT) fails so; what that model is, and the
    route that takes it, say more than the constructor's complaint."""
    if "unexpected keyword argument 'num_classes'" not in str(error):
        return ModelError(f"{spec}: {error}")
    flow = ".optical_flow." in f"{getattr(builder, '__module__', None)}."
    what = "is an optical-flow model (no num_classes)" if flow else "builds a model that takes no num_classes"
    return ModelError(
        f"{spec} {what}: bnprobe's commands train classifiers, segmentation and video models; "
        'use the Python API with a module that wraps it and returns a scalar loss (docs/api.md, "Other models")'
    )


def _load_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    name = f"bnprobe_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ModelError(f"syntax error in {e.filename}, line {e.lineno}: {e.msg}") from e
    except Exception as e:  # the user's file failed to import; say where
        raise ModelError(f"{path} failed to import: {type(e).__name__}: {e}") from e
    return module
