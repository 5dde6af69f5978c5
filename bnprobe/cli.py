"""The ``bnprobe`` command line: parse, call the library, print. No logic lives here.

Known errors (:data:`~bnprobe.cli_output.CLI_ERRORS`: the library's :class:`bnprobe.errors.BnprobeError`, usage errors)
become one line on stderr, ``bnprobe: error: ...``, and exit code 2; ``--debug`` or
``BNPROBE_DEBUG=1`` shows the library's tracebacks. Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import JustifyMethod
from rich.table import Table
from typer.core import TyperGroup

from .cli_output import CLI_ERRORS as CLI_ERRORS  # re-exported: its home is cli_output
from .cli_output import Terminated as Terminated
from .cli_output import err, follower, format_known_exception, hints_as_lines, out, rank, tell, with_progress
from .config import bn_overrides, check_continuable, config_for_ics, config_for_train, load_config, parse_assignments
from .errors import BnprobeError, PeerStopped

if TYPE_CHECKING:  # the trainer (and torch) load only when a command runs
    from .config import Config
    from .trainer import VariantResult

_state = {"debug": False}


# ----------------------------------------------------------------------------- errors


class _Bnprobe(TyperGroup):
    """The root command. Its ``main``, which the console script and typer's CliRunner both call, is
    the one place where exceptions become messages and exit codes."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args) or ["--help"]  # `bnprobe` alone: the help, exit 0
        if not standalone_mode:
            with hints_as_lines():
                return super().main(argv, prog_name, complete_var, False, windows_expand_args, **extra)
        _state["debug"] = os.environ.get("BNPROBE_DEBUG", "") not in ("", "0")  # --debug sets it again, per invocation
        try:
            with hints_as_lines():
                result = super().main(argv, prog_name, complete_var, False, windows_expand_args, **extra)
        except Exception as e:
            line = format_known_exception(e)
            if line is None or (_state["debug"] and isinstance(e, BnprobeError)):
                raise
            if follower():  # another process of a torchrun run: its own errors, named; rank 0 says that it stopped
                line = None if isinstance(e, PeerStopped) else line.replace("bnprobe: error:", f"bnprobe: error (process {rank()}):", 1)
            if line is not None:
                typer.echo(line, err=True)
            sys.exit(int(getattr(e, "exit_code", 1)))
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    name="bnprobe",
    cls=_Bnprobe,
    help="What does batch normalization do to your network? Train briefly, measure, report.",
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also BNPROBE_DEBUG=1).")] = False) -> None:
    if debug:
        _state["debug"] = True


# ----------------------------------------------------------------------------- shared options

ConfigArg = Annotated[
    Path | None, typer.Argument(help="YAML config (default: the built-in quickstart).", show_default=False, metavar="CONFIG")
]
ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="vgg | mlp | dln | torchvision:NAME | file.py:factory | pkg.mod:factory")
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        "-d",
        help="synthetic:shapes|cifar10|mnist|linear|segmentation|clips, torchvision:NAME:ROOT, imagefolder:DIR, segfolder:DIR, npz:FILE, h5:FILE",
    ),
]
BnOpt = Annotated[list[str] | None, typer.Option("--bn", help="keep | insert | strip | noisy; repeat for variants.")]
BnTargetsOpt = Annotated[str | None, typer.Option("--bn-targets", help="auto | conv | linear | all")]
KeepBiasOpt = Annotated[
    bool | None, typer.Option("--keep-bias/--drop-bias", help="Keep the bias of layers BN is inserted after.", show_default=False)
]
FoldOpt = Annotated[
    bool | None, typer.Option("--fold/--no-fold", help="With --bn strip: fold BN statistics into the feeding layer.", show_default=False)
]
HessianBlocksOpt = Annotated[
    bool | None,
    typer.Option("--hessian-blocks/--no-hessian-blocks", help="With --hessian: also each layer's own block.", show_default=False),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Any config key as KEY=VALUE (YAML value), e.g. probes.hessian.tol=1e-4; repeatable.", show_default=False),
]
SpectrumOpt = Annotated[
    bool | None,
    typer.Option("--spectrum/--no-spectrum", help="Hessian spectrum: top-k, trace, density (probes.spectrum.*).", show_default=False),
]
PerChannelOpt = Annotated[
    bool | None, typer.Option("--per-channel/--no-per-channel", help="Moments of each channel too.", show_default=False)
]
LandscapeOpt = Annotated[
    bool | None,
    typer.Option(
        "--landscape/--no-landscape",
        help="Scan the loss landscape along the gradient (by default as often as ICS, else as the moments).",
        show_default=False,
    ),
]
HessianOpt = Annotated[
    bool | None,
    typer.Option(
        "--hessian/--no-hessian", help="Top Hessian eigenvalue (by default as often as ICS, else as the moments).", show_default=False
    ),
]
LrOpt = Annotated[float | None, typer.Option(help="Learning rate.")]
BatchSizeOpt = Annotated[int | None, typer.Option("--batch-size", "-b")]
SeedOpt = Annotated[int | None, typer.Option()]
DeviceOpt = Annotated[str | None, typer.Option(help="auto | cpu | cuda[:N]")]


# The config key each option sets, by the option's parameter name: the one place where flags meet
# config keys (``--bn``, which may list variants, goes through ``bn_overrides``).
FLAG_KEYS = {
    "model": "model",
    "data": "data",
    "bn_targets": "bn_targets",
    "keep_bias": "keep_bias",
    "fold": "fold",
    "optimizer": "optimizer",
    "lr": "lr",
    "momentum": "momentum",
    "nesterov": "nesterov",
    "weight_decay": "weight_decay",
    "steps": "steps",
    "batch_size": "batch_size",
    "seed": "seed",
    "device": "device",
    "output": "output",
    "name": "name",
    "checkpoint_every": "checkpoint_every",
    "flush_every": "flush_every",
    "flush_seconds": "flush_seconds",
    "layers": "probes.layers",
    "kinds": "probes.kinds",
    "record_every": "probes.moments.every",
    "per_channel": "probes.moments.per_channel",
    "histogram_bins": "probes.moments.histogram_bins",
    "ics_every": "probes.ics.every",
    "landscape": "probes.landscape.enabled",
    "hessian": "probes.hessian.enabled",
    "hessian_blocks": "probes.hessian.blocks",
    "spectrum": "probes.spectrum.enabled",
}
_FLAG_OF = {key: "--" + name.replace("_", "-") for name, key in FLAG_KEYS.items()} | {"bn": "--bn", "variants.bn": "--bn"}


def flag_overrides(**given: Any) -> dict[str, Any]:
    """The options given (None: not given, the config decides) as dotted config keys, through :data:`FLAG_KEYS`."""
    return {FLAG_KEYS[name]: value for name, value in given.items() if value is not None}


def _summary(results: list[VariantResult], path: Path) -> None:
    from .store import Status

    table = Table(title="bnprobe: run summary", title_justify="left")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("variant", "left"),
        ("status", "left"),
        ("steps", "right"),
        ("loss*", "right"),
        ("acc*", "right"),
        ("time", "right"),
    )
    for col, justify in columns:
        table.add_column(col, justify=justify)
    for r in results:
        acc = "-" if r.final_accuracy != r.final_accuracy else f"{r.final_accuracy:.3f}"
        status = (
            f"{r.status} @ {r.diverged_step}"
            if r.diverged_step is not None
            else f"{r.status} @ {r.steps}"
            if r.status == Status.FAILED
            else r.status
        )
        table.add_row(r.name, status, str(r.steps), f"{r.final_loss:.4f}", acc, f"{r.seconds:.1f}s")
    out.print(table)
    counts = sorted({r.averaged_steps for r in results})
    steps = "/".join(map(str, counts)) + (" step" if counts == [1] else " steps")
    out.print(f"[dim]* mean of the last {steps}.[/dim] Wrote [bold]{path}[/bold]; see `bnprobe report {path}`.")


def _finish(results: list[VariantResult], path: Path) -> None:
    from .store import Status

    if not follower():
        _summary(results, path)
    failed = [r for r in results if r.status == Status.FAILED]
    if failed:
        if _state["debug"]:
            tell(failed[0].error_traceback.rstrip("\n"))
        more = f" ({len(failed) - 1} more failed; see `bnprobe report {path}`)" if len(failed) > 1 else ""
        tell(f"bnprobe: error: variant {failed[0].name} failed: {failed[0].error}; its records up to then are kept{more}")
        raise typer.Exit(2)
    if any(r.status == Status.DIVERGED for r in results):
        tell("bnprobe: error: a variant diverged (non-finite loss); its records up to then are kept")
        raise typer.Exit(3)


def _train(cfg: Config, force: bool) -> None:
    from .experiment import run_experiment

    results = with_progress(lambda on_step: run_experiment(cfg, force=force, progress=on_step)[1], cfg.output_path)
    _finish(results, cfg.output_path)


def _measure_from_run(path: Path, overrides: dict[str, Any], output: Path, force: bool) -> None:
    from .experiment import measure_from_run

    results = with_progress(lambda on_step: measure_from_run(path, overrides, output, force, on_step), output)
    _finish(results, output)


def _resume(path: Path) -> None:
    from .experiment import resume_experiment

    results = with_progress(lambda on_step: resume_experiment(path, progress=on_step), path)
    if not results:
        if not follower():
            out.print(f"Nothing to resume: every variant in {path} has finished.")
        return
    _finish(results, path)


# ----------------------------------------------------------------------------- commands


@app.command()
def train(
    config: ConfigArg = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    bn: BnOpt = None,
    bn_targets: BnTargetsOpt = None,
    keep_bias: KeepBiasOpt = None,
    fold: FoldOpt = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd | adam | adamw")] = None,
    lr: LrOpt = None,
    momentum: Annotated[float | None, typer.Option(help="SGD momentum.")] = None,
    nesterov: Annotated[bool | None, typer.Option("--nesterov/--no-nesterov", show_default=False)] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay.")] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps per variant.")] = None,
    batch_size: BatchSizeOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="HDF5 file to write ({name} is the config name).")] = None,
    name: Annotated[str | None, typer.Option(help="Experiment name.")] = None,
    layers: Annotated[list[str] | None, typer.Option("--layers", help="Glob of layer names to probe; repeatable.")] = None,
    kinds: Annotated[list[str] | None, typer.Option("--kind", help="conv | linear | norm | other; repeatable.")] = None,
    record_every: Annotated[int | None, typer.Option(help="Record moments every N steps.")] = None,
    per_channel: PerChannelOpt = None,
    histogram_bins: Annotated[int | None, typer.Option(help="Histogram bins (0: none).")] = None,
    ics_every: Annotated[int | None, typer.Option(help="Measure gradient-shift ICS every N steps (0: off).")] = None,
    landscape: LandscapeOpt = None,
    hessian: HessianOpt = None,
    hessian_blocks: HessianBlocksOpt = None,
    spectrum: SpectrumOpt = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (0: at the end).")] = None,
    flush_every: Annotated[int | None, typer.Option(help="Write buffered records to the file every N steps...")] = None,
    flush_seconds: Annotated[float | None, typer.Option(help="...or every S seconds, whichever comes first.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue an interrupted run file from its checkpoints.")] = None,
    assignments: SetOpt = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Show the resolved config and exit.")] = False,
) -> None:
    """Train briefly and record activation moments (and ICS/landscape when asked)."""
    flags = flag_overrides(
        model=model, data=data, bn_targets=bn_targets, keep_bias=keep_bias, fold=fold, optimizer=optimizer, lr=lr, momentum=momentum,
        nesterov=nesterov, weight_decay=weight_decay, steps=steps, batch_size=batch_size, seed=seed, device=device, output=output,
        name=name, layers=layers, kinds=kinds, record_every=record_every, per_channel=per_channel, histogram_bins=histogram_bins,
        ics_every=ics_every, landscape=landscape, hessian=hessian, hessian_blocks=hessian_blocks, spectrum=spectrum,
        checkpoint_every=checkpoint_every, flush_every=flush_every, flush_seconds=flush_seconds,
    )  # fmt: skip
    overrides = flags | bn_overrides(bn) | parse_assignments(assignments or [])
    if resume is not None:
        if overrides or config is not None or force or print_config:
            raise BnprobeError(f"--resume continues {resume} with the config stored in it; drop the other options and arguments")
        _resume(resume)
        return
    cfg = config_for_train(config, overrides)
    if print_config:
        out.print(cfg.to_yaml(), end="", markup=False)
        return
    _train(cfg, force)


@app.command("measure-ics")
def measure_ics(
    target: Annotated[
        Path | None,
        typer.Argument(
            help="Config YAML, or a finished run's .h5 to continue from its checkpoints.", show_default=False, metavar="CONFIG|RUN.h5"
        ),
    ] = None,
    ics_every: Annotated[int | None, typer.Option(help="Measure every N steps (default: the config's, else 10).")] = None,
    layers: Annotated[list[str] | None, typer.Option("--layers", help="Glob of layer names to measure; repeatable.")] = None,
    landscape: Annotated[
        bool | None,
        typer.Option("--landscape/--no-landscape", help="Also scan the loss landscape along the gradient.", show_default=False),
    ] = None,
    hessian: Annotated[
        bool | None, typer.Option("--hessian/--no-hessian", help="Also the top Hessian eigenvalue.", show_default=False)
    ] = None,
    hessian_blocks: HessianBlocksOpt = None,
    spectrum: SpectrumOpt = None,
    bn: BnOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    steps: Annotated[int | None, typer.Option(help="Training steps (from a run file: further steps).")] = None,
    lr: LrOpt = None,
    batch_size: BatchSizeOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="HDF5 file to write.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    assignments: SetOpt = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Show the resolved config and exit.")] = False,
) -> None:
    """Santurkar et al.'s protocol: gradient-shift ICS (and the loss landscape) while training."""
    flags = flag_overrides(
        ics_every=ics_every, layers=layers, landscape=landscape, hessian=hessian, hessian_blocks=hessian_blocks, spectrum=spectrum,
        model=model, data=data, steps=steps, lr=lr, batch_size=batch_size, seed=seed, device=device, output=output,
    )  # fmt: skip
    flags |= bn_overrides(bn)
    sets = parse_assignments(assignments or [])
    overrides = flags | sets
    if target is not None and target.suffix in (".h5", ".hdf5"):
        check_continuable(overrides, str(target), {key: _FLAG_OF[key] for key in flags} | {key: f"--set {key}" for key in sets})
        _measure_from_run(target, overrides, Path(output) if output else target.with_name(f"{target.stem}-ics.h5"), force)
        return
    cfg = config_for_ics(target, overrides)
    if print_config:
        out.print(cfg.to_yaml(), end="", markup=False)
        return
    _train(cfg, force)


@app.command()
def report(
    paths: Annotated[list[Path], typer.Argument(help="bnprobe .h5 files.", show_default=False, metavar="RUN.h5")],
    layers: Annotated[str | None, typer.Option("--layers", help="Comma-separated globs of layer names.")] = None,
    stat: Annotated[str | None, typer.Option("--stat", help="Statistic for the sparklines (default: mean).")] = None,
    variant: Annotated[str | None, typer.Option("--variant", help="Comma-separated variant names or globs.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Rich tables of what runs recorded, variants side by side."""
    from .report import build_report, render_report

    content = build_report(paths, layers=layers, stat=stat, variant=variant)
    if as_json:
        typer.echo(json.dumps(content, indent=2))
    else:
        render_report(content, out)


@app.command()
def export(
    path: Annotated[Path, typer.Argument(help="bnprobe .h5 file.", show_default=False, metavar="RUN.h5")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="csv | json | npz | parquet")] = "csv",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output file (default: next to the input; -: standard output, csv/json).")
    ] = None,
    variant: Annotated[str | None, typer.Option("--variant", help="Comma-separated variant names or globs.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Export records as one tidy long table (variant, section, step, layer, quantity, channel, eta, bin, value)."""
    from .export import export as export_table

    written = export_table(path, fmt, output or path.with_suffix(f".{fmt}"), force=force, variant=variant)
    if str(written) != "-":  # standard output holds the table alone
        err.print(f"Wrote {written}")


@app.command()
def plot(
    paths: Annotated[list[Path], typer.Argument(help="bnprobe .h5 files.", show_default=False, metavar="RUN.h5")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Figure file: .png, .svg or .pdf.")],
    kind: Annotated[str, typer.Option("--kind", "-k", help="moments | ics | landscape | training | hessian")] = "moments",
    layer: Annotated[str | None, typer.Option("--layer", help="Layer name or glob (moments: one layer; ics: up to 6).")] = None,
    variant: Annotated[str | None, typer.Option("--variant", help="Comma-separated variant names or globs.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Figures of the papers: percentiles over training, ICS per layer, landscape bands, training curves."""
    from .plot import plot as draw

    written = draw(paths, output, kind=kind, layer=layer, force=force, variant=variant)
    err.print(f"Wrote {written}")


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="Model spec, e.g. vgg or torchvision:resnet18.", show_default=False, metavar="MODEL")],
    bn: Annotated[str, typer.Option("--bn", help="keep | insert | strip | noisy")] = "insert",
    data: DataOpt = None,
    bn_targets: BnTargetsOpt = None,
    keep_bias: KeepBiasOpt = None,
    fold: FoldOpt = None,
) -> None:
    """Show the BatchNorm surgery plan for a model (what is inserted, removed, re-biased) without training."""
    overrides = flag_overrides(model=model, data=data, bn_targets=bn_targets, keep_bias=keep_bias, fold=fold) | bn_overrides([bn])
    from .trainer import inspect_model

    plan = inspect_model(load_config(None, overrides))
    table = Table(title=f"bnprobe inspect {model} --bn {bn}{' --fold' if fold else ''}", title_justify="left")
    for col in plan.columns:
        table.add_column(col, overflow="fold")
    for row in plan.rows():
        table.add_row(*row)
    out.print(table)
    out.print(plan.summary())


def main() -> None:
    """The console script (see :class:`_Bnprobe` for how errors end it)."""
    app()


if __name__ == "__main__":
    main()
