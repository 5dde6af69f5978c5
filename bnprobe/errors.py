"""User-facing errors: each becomes one line on stderr and exit code 2 in the CLI."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable
from pathlib import Path


class BnprobeError(Exception):
    """A problem the user can fix (bad config, unknown model, wrong file); never a bug."""

    exit_code = 2  # the command line's, after its one-line message


class ConfigError(BnprobeError):
    """The config file or a CLI option is invalid."""


class ModelError(BnprobeError):
    """A model cannot be built, loaded or run on the data."""


class PeerStopped(BnprobeError):
    """Another process of a torchrun run stopped; it prints why (this one says nothing more)."""


class DataError(BnprobeError):
    """A data source is missing or malformed."""


class StoreError(BnprobeError):
    """An HDF5 file is missing, not a bnprobe file, truncated, or would be overwritten."""


class SurgeryError(BnprobeError):
    """BatchNorm surgery cannot be planned on this model."""


def shown(value: object, limit: int = 60) -> str:
    """A ``repr`` of ``value`` cut to about ``limit`` characters, in bounded time, so that a message
    stays one readable line whatever the user passed (a huge string, a deeply nested list)."""
    brief = reprlib.Repr()
    brief.maxstring = brief.maxother = brief.maxlong = limit
    brief.maxlevel, brief.maxlist, brief.maxtuple, brief.maxdict = 2, 4, 4, 4
    try:
        text = brief.repr(value)
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits)
        text = f"<a {type(value).__name__} too long to show>"
    return clip(text, limit)


def usable_path(path: str | Path, error: type[BnprobeError]) -> Path:
    """``path`` as a :class:`Path` the OS can at least look up: a name too long for the file system,
    a NUL byte or a directory without permission is ``error`` (``Path.is_file`` raises on those)."""
    p = Path(path)
    try:
        p.stat()
    except (FileNotFoundError, NotADirectoryError):
        pass
    except (OSError, ValueError) as e:
        raise error(f"cannot use {clip(str(p))}: {getattr(e, 'strerror', None) or e}") from None
    return p


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when empty), for one-line errors."""
    return clip((str(e).splitlines() or [type(e).__name__])[0], limit)


def described(e: BaseException, limit: int = 200) -> str:
    """``TypeName: first line of the message`` (the name alone when the message is empty)."""
    message = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {clip(message, limit)}" if message else type(e).__name__


def clip(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters, keeping both ends (a long path keeps its file name)."""
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return text[:half] + "..." + text[len(text) - half :]


def closest(word: str, choices: Iterable[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The ``n`` of ``choices`` closest to a mistyped ``word`` (best first; empty when none is close)."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)


def did_you_mean(word: str, choices: Iterable[str], n: int = 1, cutoff: float = 0.6, otherwise: str = "") -> str:
    """``"; did you mean 'x'?"`` naming the ``n`` closest of ``choices`` to a mistyped ``word``, or
    ``otherwise`` when none is close: the one hint every unknown-name error gives."""
    close = closest(word, choices, n, cutoff)
    if not close:
        return otherwise
    return "; did you mean " + ", ".join(repr(c) for c in close) + "?"
