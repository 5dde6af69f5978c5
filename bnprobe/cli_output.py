"""What the command line prints besides its commands' results: the one-line error and warning
messages, the progress bars while runs train, and how SIGINT/SIGTERM end a run at a step boundary.
Kept apart from :mod:`bnprobe.cli`, which parses the options and calls the library.
"""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from .config import RenamedKeyWarning
from .errors import BnprobeError, clip

if TYPE_CHECKING:
    from pathlib import Path

    from .trainer import ProgressFn, StepInfo, VariantResult

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


# ----------------------------------------------------------------------------- errors and warnings


def _error_line(e: BnprobeError) -> str:
    message = " ".join(str(e).split())  # one line, whatever a library put in the message
    return f"bnprobe: error: {clip(message, 500)}"


def _usage_line(e: typer.TyperException) -> str:
    ctx = getattr(e, "ctx", None)  # a usage error knows the command it is about
    where = ctx.command_path if ctx is not None else "bnprobe"
    return f"bnprobe: error: {e.format_message()} (see `{where} --help`)"


def _abort_line(_e: typer.Abort) -> str:
    return "bnprobe: aborted"


# Known exceptions and the one stderr line each becomes; the exit code is the exception's own
# ``exit_code`` (2 for BnprobeError and click's usage errors), else 1. Subclasses before parents:
# the first entry that matches is used.
CLI_ERRORS: dict[type[Exception], Callable[[Any], str]] = {
    BnprobeError: _error_line,
    typer.TyperException: _usage_line,
    typer.Abort: _abort_line,
}


def format_known_exception(e: BaseException) -> str | None:
    """The one stderr line for a known exception; None for anything else (a bug, which shows its traceback)."""
    for kind, line in CLI_ERRORS.items():
        if isinstance(e, kind):
            return line(e)
    return None


@contextmanager
def hints_as_lines() -> Iterator[None]:
    """A config's hint (:class:`RenamedKeyWarning`: an older key, read under its new name) as one line
    on stderr, ``bnprobe: warning: ...``, each time; other warnings as Python shows them."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", RenamedKeyWarning)
        python_shows = warnings.showwarning

        def show(
            message: Warning | str, category: type[Warning], filename: str, lineno: int, file: TextIO | None = None, line: str | None = None
        ) -> None:
            if issubclass(category, RenamedKeyWarning):
                tell(f"bnprobe: warning: {message}")
            else:
                python_shows(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def rank() -> str:
    """This process's rank under torchrun ("0" otherwise), from its environment: no torch import."""
    return os.environ.get("RANK", "0")


def follower() -> bool:
    """A process of a torchrun run other than rank 0: it prints no progress or summary (rank 0 does)."""
    return rank() != "0"


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered as an interrupt so runs flush and mark themselves ``interrupted``."""


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.1f} steps/s"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )


class StopRequests:
    """SIGINT/SIGTERM while steps run stop the run at the next step boundary, where nothing is
    half-written. An interrupt raised at an arbitrary bytecode can land in a weakref callback or a
    ``__del__``, where Python prints "Exception ignored" and goes on, so the run would never stop.
    Before the first step, or on a second signal, the interrupt is raised at once."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.stepping = False

    def on_signal(self, sig: int, _frame: Any) -> None:
        again = self.pending is not None
        self.pending = sig
        if again or not self.stepping:
            raise self._exception(sig)

    def check(self) -> None:
        """Raise the pending interrupt, if any; called once a step is recorded. Under torchrun a
        signal any process got stops every process at this same step; one that arrives while this
        process waits for the others' vote stays pending for the next step's."""
        from .distributed import agreed_signal

        self.stepping = True
        agreed = agreed_signal(self.pending)
        if agreed is not None:
            self.pending = agreed
            raise self._exception(agreed)

    @staticmethod
    def _exception(sig: int) -> KeyboardInterrupt:
        return Terminated() if sig == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def interrupts(path_hint: str, started: Callable[[], bool], stops: StopRequests) -> Iterator[None]:
    """SIGINT and SIGTERM end the command with 130 / 143 after the current step (see
    :class:`StopRequests`); ``started()`` tells whether a step was recorded (before that, no file
    is left behind)."""
    previous = signal.signal(signal.SIGTERM, stops.on_signal)
    previous_int = signal.signal(signal.SIGINT, stops.on_signal)  # even when started with SIGINT ignored
    try:
        yield
    except KeyboardInterrupt as e:
        if started():
            tell(f"bnprobe: interrupted; what was recorded is in {path_hint} (status: interrupted)")
        else:
            tell("bnprobe: interrupted before the first step; nothing was written")
        raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def with_progress(run: Callable[[ProgressFn], list[VariantResult]], path: Path) -> list[VariantResult]:
    """Call ``run(on_step)`` with a live progress bar per variant; interrupts end it cleanly."""
    progress = _progress()
    tasks: dict[str, TaskID] = {}
    stops = StopRequests()

    def on_step(info: StepInfo) -> None:
        if follower():
            stops.check()
            return
        if not tasks:
            progress.start()
        if info.variant not in tasks:
            tasks[info.variant] = progress.add_task(info.variant, total=info.steps, loss=float("nan"), rate=0.0)
        progress.update(tasks[info.variant], completed=info.step, loss=info.loss, rate=info.steps_per_second)
        stops.check()

    with interrupts(str(path), lambda: bool(tasks), stops):
        try:
            results = run(on_step)
        finally:
            if tasks:  # stopping a bar that never started would print a stray blank line
                progress.stop()
    return results


def tell(line: str) -> None:
    """A line on stderr, from rank 0 only under torchrun."""
    if not follower():
        typer.echo(line, err=True)
