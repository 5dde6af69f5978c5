"""Time of ``apply_bn(model, "strip", x, fold=True)`` on models with hundreds of BNs (target: under 1 s
on ghostnetv3_050, 326 BNs in 2,269 modules), against strip without fold.

Fold must grow with the model, not with BNs x modules: swapping each BN and checking each feeder's
parameters for sharing used to walk every module once per BN. The extra time of fold over strip is
its safety check (a twin of the model with its own tensors and two eval forwards, in float64 only
when the model's own dtype shows a difference), linear in the model.

    python benchmarks/fold_cost.py                                   # the models below, 64 px
    python benchmarks/fold_cost.py --models timm:ghostnetv3_050 --no-record   # a quick check
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from torch import nn

import bnprobe
from bnprobe.errors import BnprobeError
from bnprobe.surgery import is_batchnorm

MODELS = ("timm:ghostnetv3_050", "torchvision:efficientnet_b0", "torchvision:mobilenet_v3_large")


def seconds(model: nn.Module, x: torch.Tensor, fold: bool, repeats: int) -> float:
    """The fastest of ``repeats`` strips (a shared machine only ever adds time)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        bnprobe.apply_bn(model, "strip", x, fold=fold)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    from _results import Table, add_record_flag, finish  # benchmarks/ is sys.path[0] when run as a script

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="model specs, as bnprobe's --model takes them")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--repeats", type=int, default=3)
    add_record_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[Sequence[str]] = []
    for spec in args.models:
        torch.manual_seed(0)
        try:
            model = bnprobe.build_model(spec, 10, (3, args.size, args.size))
        except BnprobeError as e:  # timm not installed, say
            print(f"{spec}: skipped ({e})", flush=True)
            continue
        x = torch.randn(2, 3, args.size, args.size)
        bns, modules = sum(is_batchnorm(m) for m in model.modules()), sum(1 for _ in model.modules())
        strip, fold = seconds(model, x, False, args.repeats), seconds(model, x, True, args.repeats)
        rows.append([spec, str(bns), str(modules), f"{strip:.2f}", f"{fold:.2f}"])
        print(f"{spec}: {bns} BNs, {modules} modules; strip {strip:.2f} s, fold {fold:.2f} s", flush=True)
    out = Table(
        f"strip and strip --fold, batch 2 at {args.size} px, best of {args.repeats}", ["model", "BNs", "modules", "strip s", "fold s"], rows
    )
    print(out.text())
    finish("fold_cost", [out], args.no_record)


if __name__ == "__main__":
    main()
