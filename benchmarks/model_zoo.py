"""Every torchvision classification and segmentation model, the BatchNorm3d video models and a fixed
timm sample through bnprobe.

For each model, at the smallest input it accepts (batch 2, 10 classes, random init; video models
clips of VIDEO_FRAMES frames), the checks:

    build     the model is built and runs forward in train mode
    keep      apply_bn keep, then a training forward/backward
    insert    apply_bn insert, then a training forward/backward
    strip     apply_bn strip, then a training forward/backward; no BatchNorm left running
    fold      apply_bn strip --fold on a model whose BNs look trained (running statistics of its own
              activations, random affine): eval outputs on a *different* batch equal the original's
              to 1e-4 (relative), or the plan says, per BN, why it was stripped without folding.
              A model that amplifies rounding beyond 1e-4 passes when its float64 fold is exact to
              1e-4 (or within 10x what float64 rounding alone does: an untrained EfficientNetV2-L at
              28 px is chaotic) and the float32 difference is within 10x what rounding alone does
    noisy     apply_bn noisy, then a training forward/backward
    recorder  bnprobe.Recorder around two SGD steps
    hessian   top_hessian_eigenvalue (2 power iterations), finite
    ics       gradient_shift (fast) with SGD, one step

Each cell is ``ok``, ``refused`` (a one-line bnprobe error: the model genuinely cannot do this) or
``FAIL`` (anything else: a bug), with the reason. tests/test_zoo.py runs the same checks.

    python benchmarks/model_zoo.py                         # torchvision and timm
    python benchmarks/model_zoo.py --source torchvision --limit 5
    python benchmarks/model_zoo.py --include 'resnet*' --include 'dens*' --checks fold hessian

The summary and every cell that is not ``ok`` go to benchmarks/RESULTS.md (``--no-record``: not).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import importlib.util
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import bnprobe
from bnprobe.errors import BnprobeError
from bnprobe.surgery import is_batchnorm

CHECKS = ("build", "keep", "insert", "strip", "fold", "noisy", "recorder", "hessian", "ics")
FOLD_RTOL = 1e-4
BATCH = 2
NUM_CLASSES = 10
SIZES = (28, 32, 64, 96, 128, 160, 192, 224, 256, 299)
VIDEO_MODELS = ("r3d_18", "mc3_18", "r2plus1d_18", "s3d")  # torchvision's video models with BatchNorm3d
VIDEO_FRAMES = 16  # s3d's last pooling needs 16 frames (and 224 pixels)

# A fixed timm sample across families (with and without BN, BN-act layers, BN before conv, attention).
TIMM_MODELS = (
    "resnet18",
    "resnet26t",
    "resnet50d",
    "seresnet18",
    "legacy_seresnet18",
    "resnext26ts",
    "ecaresnet26t",
    "skresnet18",
    "res2net50_14w_8s",
    "resnest14d",
    "efficientnet_b0",
    "efficientnet_lite0",
    "tf_efficientnet_b0",
    "efficientnetv2_rw_t",
    "mobilenetv3_small_050",
    "mobilenetv3_large_100",
    "tf_mobilenetv3_small_minimal_100",
    "mobilenetv2_050",
    "mnasnet_small",
    "fbnetc_100",
    "spnasnet_100",
    "mixnet_s",
    "ghostnet_050",
    "ghostnetv2_100",
    "rexnet_100",
    "rexnetr_100",
    "regnetx_002",
    "regnety_002",
    "regnetz_005",
    "densenet121",
    "dla34",
    "dla46_c",
    "dla60x_c",
    "dpn48b",
    "cspresnet50",
    "cs3darknet_s",
    "ese_vovnet19b_dw",
    "hrnet_w18_small",
    "hrnet_w18_small_v2",
    "repvgg_a0",
    "repghostnet_050",
    "hardcorenas_a",
    "lcnet_050",
    "tinynet_e",
    "convnext_atto",
    "convnextv2_atto",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "mixer_s32_224",
    "resmlp_12_224",
    "levit_128s",
    "levit_conv_128s",
    "nf_resnet26",
    "nf_regnet_b0",
    "gernet_s",
    "selecsls42b",
    "inception_v3",
    "efficientformer_l1",
    "mobilevit_xxs",
    "mobilevitv2_050",
    "edgenext_xx_small",
    "poolformer_s12",
    "pit_ti_224",
    "xcit_nano_12_p16_224",
    "visformer_tiny",
    "fastvit_t8",
    "efficientvit_b0",
    "efficientvit_m0",
    "mobileone_s0",
    "hgnetv2_b0",
    "resnetv2_50x1_bit",
    "halonet26t",
    "gcresnet33ts",
    "pvt_v2_b0",
    "inception_next_tiny",
    "vgg11_bn",
    "mobilenetv4_conv_small",
    "repvit_m0_9",
    "tiny_vit_5m_224",
    "darknet17",
    "fbnetv3_b",
    "semnasnet_050",
)


@dataclass
class Cell:
    status: str  # ok | refused | FAIL | skipped
    note: str = ""

    def __str__(self) -> str:
        return self.status if not self.note else f"{self.status}({self.note})"


@dataclass
class Case:
    """A model to check: where it comes from and how to build it at an input size."""

    source: str  # torchvision | timm
    name: str
    build: Callable[[int], nn.Module] = field(repr=False)
    frames: int = 0  # a video model's clip length; 0: images

    def sample_shape(self, size: int) -> tuple[int, ...]:
        """One input sample at ``size`` pixels: (3, size, size), or (3, frames, size, size)."""
        return (3, self.frames, size, size) if self.frames else (3, size, size)

    @property
    def id(self) -> str:
        return f"{self.source}:{self.name}"


def torchvision_names() -> list[str]:
    """The classification models, then the segmentation ones (detection models need box targets: bnprobe refuses them)."""
    import torchvision

    modules = (torchvision.models, torchvision.models.segmentation)
    return [name for module in modules for name in torchvision.models.list_models(module=module)]


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def _torchvision_builder(name: str, frames: int = 0) -> Callable[[int], nn.Module]:
    def build(size: int) -> nn.Module:
        if frames:
            return bnprobe.build_model(f"torchvision:{name}", NUM_CLASSES, (3, frames, size, size))
        options: dict[str, Any] = {}
        if name.startswith("vit_"):  # the patch grid is fixed at construction (size: a multiple of the patch)
            options["image_size"] = size
        elif name.startswith("maxvit"):
            options["input_size"] = (size, size)
        return bnprobe.build_model(f"torchvision:{name}", NUM_CLASSES, (3, size, size), **options)

    return build


def _timm_builder(name: str) -> Callable[[int], nn.Module]:
    def build(size: int) -> nn.Module:
        import timm

        try:  # models with a fixed token grid take their input size at construction
            return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, img_size=size)
        except TypeError:
            return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)

    return build


def cases(source: str = "all", include: list[str] | None = None, limit: int = 0) -> list[Case]:
    """The models to check, in a fixed order; ``include`` globs match the bare name or ``source:name``."""
    found: list[Case] = []
    if source in ("all", "torchvision"):
        found += [Case("torchvision", n, _torchvision_builder(n)) for n in torchvision_names()]
        found += [Case("torchvision", n, _torchvision_builder(n, VIDEO_FRAMES), VIDEO_FRAMES) for n in VIDEO_MODELS]
    if source in ("all", "timm") and timm_available():
        found += [Case("timm", n, _timm_builder(n)) for n in TIMM_MODELS]
    if include:
        found = [c for c in found if any(fnmatch.fnmatchcase(c.name, p) or fnmatch.fnmatchcase(c.id, p) for p in include)]
    return found[:limit] if limit else found


# ----------------------------------------------------------------------------- checks


def loss_fn(out: Any, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the logits (the first output of models that return several in training); a
    segmentation model's per-pixel logits (its dict's ``"out"``) against its image's label at every pixel."""
    if isinstance(out, (tuple, list)):
        return sum(F.cross_entropy(o, y) for o in out) / len(out)
    if isinstance(out, dict):
        out = out["out"]
    if out.ndim == 4:
        return F.cross_entropy(out, y[:, None, None].expand(-1, *out.shape[2:]))
    return F.cross_entropy(out, y)


def batch(shape: tuple[int, ...], n: int = BATCH, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random samples of ``shape`` and their labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(NUM_CLASSES, (n,), generator=g)


def smallest_input(case: Case) -> tuple[nn.Module, tuple[int, ...]]:
    """The model built at the smallest size in SIZES whose training forward runs on a batch of 2, and its sample shape."""
    errors = []
    for size in SIZES:
        try:
            torch.manual_seed(0)
            model = case.build(size)
            with torch.no_grad():
                model.train()(batch(case.sample_shape(size))[0])
            return model, case.sample_shape(size)
        except Exception as e:  # noqa: BLE001 - a size the model refuses: try the next
            errors.append(f"{size}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise RuntimeError(f"no input size in {SIZES} works; last: {errors[-1]}")


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    loss = loss_fn(model(x), y)
    loss.backward()
    if not torch.isfinite(loss):
        raise AssertionError(f"training loss is {loss.item()}")


def trained_looking_bn(model: nn.Module, shape: tuple[int, ...], seed: int = 1) -> None:
    """BN as after training: running statistics of the model's own activations (two batches in
    train mode), and a random affine. Random statistics instead would leave activations
    unnormalised and the untrained model so ill-conditioned that float32 rounding of the folded
    weights alone moves its output by over 1e-4 (EfficientNetV2 among them)."""
    bns = [m for m in model.modules() if is_batchnorm(m)]
    momenta = {m: getattr(m, "momentum", None) for m in bns}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in bns:
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
        model.train()
        for k in range(4):
            model(batch(shape, n=8, seed=100 + k)[0])
        for m in bns:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = momenta[m]
            elif getattr(m, "running_mean", None) is not None:  # FrozenBatchNorm2d: no batch statistics to take
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(0.8 + 0.4 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    model.eval()


def _relative(a: Any, b: Any) -> float:
    """Largest relative (norm-wise) difference between two outputs (tensors or tuples of them)."""
    ta = [a] if isinstance(a, torch.Tensor) else list(a.values() if isinstance(a, dict) else a)
    tb = [b] if isinstance(b, torch.Tensor) else list(b.values() if isinstance(b, dict) else b)
    return max(float((p.double() - q.double()).norm() / q.double().norm().clamp_min(1e-30)) for p, q in zip(ta, tb))


def check_surgery(model: nn.Module, shape: tuple[int, ...], mode: str) -> str:
    x, y = batch(shape)
    changed, plan = bnprobe.apply_bn(model, mode, x)
    _train_step(changed, x, y)
    if mode == "strip":
        ran = []
        hooks = [m.register_forward_hook(lambda m, i, o, ran=ran: ran.append(m)) for m in changed.modules() if is_batchnorm(m)]
        with torch.no_grad():
            changed(x)
        for h in hooks:
            h.remove()
        if ran:
            raise AssertionError(f"{len(ran)} BatchNorm calls left after strip")
    return plan.summary().split(";")[0].removeprefix(f"bn {mode}: ")


def check_fold(model: nn.Module, shape: tuple[int, ...]) -> str:
    trained_looking_bn(model, shape)
    example, _ = batch(shape)
    other, _ = batch(shape, n=BATCH + 1, seed=7)  # another batch, of another size: fold is exact for every input
    folded, plan = bnprobe.apply_bn(model, "strip", example, fold=True)
    bns = [n for n, m in model.named_modules() if is_batchnorm(m)]
    unfolded = [c for c in plan.changes if c.action == "removed"]
    if any(not c.detail for c in unfolded):
        raise AssertionError("a BN was stripped without folding and the plan says not why")
    if len([c for c in plan.changes if c.action in ("folded", "removed")]) != len(bns):
        raise AssertionError(f"the plan accounts for {len(plan.changes)} of {len(bns)} BNs")
    if not bns:
        return "no BN"
    if unfolded:
        return f"{len(unfolded)} of {len(bns)} {unfolded[0].detail.split(';')[0]}"
    with torch.no_grad():
        diff = _relative(folded.eval()(other), model(other))
    if diff <= FOLD_RTOL:
        return f"{len(bns)} folded, {diff:.0e}"
    # Beyond 1e-4 in float32: the fold must be exact in float64, and the float32 difference no more
    # than the model's own amplification of float32 rounding (every weight moved by 2^-24).
    twin = copy.deepcopy(model).double()
    folded64, _ = bnprobe.apply_bn(twin, "strip", example.double(), fold=True)
    with torch.no_grad():
        diff64 = _relative(folded64.eval()(other.double()), twin(other.double()))
        noise, noise64 = _rounding_noise(model, other), _rounding_noise(twin, other.double())
    if diff64 > max(FOLD_RTOL, 10 * noise64) or diff > 10 * noise:
        raise AssertionError(
            f"folded eval output differs by {diff:.1e} (relative; float64 {diff64:.0e}, rounding alone {noise:.0e} / float64 {noise64:.0e})"
        )
    return f"{len(bns)} folded, {diff:.0e} = rounding (alone {noise:.0e}; float64 {diff64:.0e}, alone {noise64:.0e})"


def _rounding_noise(model: nn.Module, x: torch.Tensor) -> float:
    """How far the eval output moves when every weight moves by one rounding step of its dtype."""
    rounded = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    for p in rounded.parameters():
        p.mul_(1 + torch.finfo(p.dtype).eps / 2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return _relative(rounded(x), model(x))


def check_recorder(model: nn.Module, shape: tuple[int, ...]) -> str:
    x, y = batch(shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as tmp, bnprobe.Recorder(model, Path(tmp) / "run.h5", record_every=1) as rec:
        for _ in range(2):
            optimizer.zero_grad()
            loss = loss_fn(model.train()(x), y)
            loss.backward()
            optimizer.step()
            rec.step(loss=loss)
        layers = len(rec.layers)
    return f"{layers} layers"


def check_hessian(model: nn.Module, shape: tuple[int, ...]) -> str:
    x, y = batch(shape)
    result = bnprobe.top_hessian_eigenvalue(model.train(), loss_fn, x, y, max_iter=2)
    if not torch.isfinite(torch.tensor(result.eigenvalue)):
        raise AssertionError(f"eigenvalue {result.eigenvalue}")
    return f"{result.eigenvalue:.2g}"


def check_ics(model: nn.Module, shape: tuple[int, ...]) -> str:
    x, y = batch(shape)
    result = bnprobe.gradient_shift(model.train(), loss_fn, x, y, torch.optim.SGD(model.parameters(), lr=1e-3))
    return f"{len(result)} layers"


def run_check(check: str, model: nn.Module, shape: tuple[int, ...]) -> Cell:
    """One check on a fresh copy of the model (checks that train change it)."""
    fresh = copy.deepcopy(model)
    try:
        if check in ("keep", "insert", "strip", "noisy"):
            note = check_surgery(fresh, shape, check)
        else:
            note = {"fold": check_fold, "recorder": check_recorder, "hessian": check_hessian, "ics": check_ics}[check](fresh, shape)
        return Cell("ok", note)
    except BnprobeError as e:
        return Cell("refused", str(e))
    except Exception as e:  # noqa: BLE001 - anything else is a failure to report, with where it came from
        where = traceback.extract_tb(e.__traceback__)[-1]
        return Cell("FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} [{Path(where.filename).name}:{where.lineno}]")


def check_model(case: Case, checks: tuple[str, ...] = CHECKS, max_params: float = 0) -> dict[str, Cell]:
    """Every check of ``checks`` on one model; a model that cannot be built fails ``build`` only."""
    row: dict[str, Cell] = {}
    try:
        model, shape = smallest_input(case)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {"build": Cell("FAIL", str(e).splitlines()[0])}
    params = sum(p.numel() for p in model.parameters())
    row["build"] = Cell("ok", f"{'x'.join(map(str, shape[1:]))}, {params / 1e6:.1f}M")
    too_big = max_params and params > max_params
    for check in checks:
        if check == "build":
            continue
        row[check] = Cell("skipped", f"> {max_params / 1e6:g}M params") if too_big else run_check(check, model, shape)
    return row


# ----------------------------------------------------------------------------- table


def tables(counts: dict[str, Counter[str]], problems: list[tuple[str, str, Cell]]) -> list[Any]:
    """The summary (per check: ok / refused / FAIL / skipped) and every cell that is not ok, as ``_results.Table``s."""
    from _results import Table  # benchmarks/ is sys.path[0] when run as a script; tests load this module by path

    statuses = ("ok", "refused", "FAIL", "skipped")
    rows = [[check, *(str(counts[check][k]) for k in statuses)] for check in CHECKS if sum(counts[check].values())]
    if not problems:
        return [Table("summary", ["check", *statuses], rows, ["every check ok"])]
    not_ok = Table(
        "every cell that is not ok", ["model", "check", "result"], [[model, check, str(cell)] for model, check, cell in problems]
    )
    return [Table("summary", ["check", *statuses], rows), not_ok]


def main(argv: list[str] | None = None) -> int:
    from _results import add_record_flag, finish

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("all", "torchvision", "timm"), default="all")
    parser.add_argument("--timm", dest="source", action="store_const", const="timm", help="only the timm sample")
    parser.add_argument("--include", action="append", help="glob on the model name (repeatable)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many models")
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    parser.add_argument("--max-params", type=float, default=0, help="skip the checks of larger models (0: none skipped)")
    add_record_flag(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    selected = cases(args.source, args.include, args.limit)
    checks = tuple(c for c in CHECKS if c in args.checks)
    counts: dict[str, Counter[str]] = {c: Counter() for c in CHECKS}
    problems: list[tuple[str, str, Cell]] = []
    print(f"{len(selected)} models; checks: {', '.join(checks)}", flush=True)
    for case in selected:
        start = time.perf_counter()
        row = check_model(case, checks, args.max_params)
        for check, cell in row.items():
            counts[check][cell.status] += 1
            if cell.status != "ok":
                problems.append((case.id, check, cell))
        cells = "  ".join(f"{c}={row[c].status}" for c in CHECKS if c in row)
        print(f"{case.id:45s} {time.perf_counter() - start:6.1f}s  {cells}", flush=True)
        for check, cell in row.items():
            print(f"    {check:9s} {cell}", flush=True)
    out = tables(counts, problems)
    print("\n" + "\n\n".join(t.text() for t in out))
    finish("model_zoo", out, args.no_record)
    return 1 if any(c["FAIL"] for c in counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
