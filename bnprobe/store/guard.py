"""What keeps an output whole: outputs checked before they are written (:func:`check_output_path`),
written under a temporary name and renamed (:func:`atomic_output`), one writer per file
(:class:`OutputLock`), no signal in the middle of a write (:func:`signals_deferred`), and no write
the disk has no room for (:func:`make_room`).

Files are opened without HDF5's own locking (readers such as ``bnprobe report`` must read a live
run), so writers exclude each other with :class:`OutputLock`: an ``flock`` on ``.NAME.lock``
beside the output, which the kernel releases when its process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import signal
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from ..errors import StoreError, clip, first_line

#: free space kept beyond the raw data of a write, for HDF5's metadata and the final ``failed`` status
SPACE_MARGIN = 256 * 1024


def check_output_path(path: Path, force: bool = False, create_parent: bool = False, inputs: Sequence[str | Path] = ()) -> bool:
    """Refuse an output that would replace a user's file (without ``force``), one of the ``inputs``
    it is made from (even with ``force``), or cannot be written (a name too long for the file
    system, a NUL byte in it). Returns whether it made the parent directory (``create_parent``),
    which whoever discards the output then removes too."""
    where = clip(str(path))
    made_parent = False
    try:
        if path.exists() and any(path.samefile(p) for p in inputs if Path(p).exists()):
            raise StoreError(f"{where} is the file being read; choose another --output")
        if create_parent and not path.parent.exists() and path.parent.parent.is_dir():
            path.parent.mkdir()
            made_parent = True
        if path.is_dir():
            raise StoreError(f"{where} is a directory, not an output file")
        if path.exists() and not stat.S_ISREG(path.stat().st_mode):
            raise StoreError(f"{where} is not a regular file (a device, pipe or socket); choose another --output")
        if path.exists() and not force:
            raise StoreError(f"{where} already exists; choose another --output or pass --force to replace it")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise StoreError(f"output directory {clip(str(parent))} does not exist; create it first")
        if not os.access(parent, os.W_OK):
            raise StoreError(f"output directory {clip(str(parent))} is not writable")
        # The temporary name is the longest name written: one too long fails here, before any writing.
        os.stat(partial_path(path), follow_symlinks=False)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        if made_parent:
            path.parent.rmdir()
        raise StoreError(f"cannot write {where}: {getattr(e, 'strerror', None) or e}") from None
    return made_parent


def partial_path(path: Path) -> Path:
    """The temporary name (``.NAME.partial``, beside it) an output is written under before it replaces ``path``."""
    return path.with_name(f".{path.name}.partial")


@contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """All or nothing: the block writes the path it is given (a temporary file beside ``out``), which
    then replaces ``out``; on any error the temporary file is removed and ``out`` stays as it was.
    An ``OSError`` becomes a one-line :class:`StoreError`. Another process writing ``out`` (which
    would share the temporary file) is refused before anything is written."""
    tmp = partial_path(out)
    with OutputLock.acquire(out):
        try:
            yield tmp
            os.replace(tmp, out)
        except OSError as e:
            raise StoreError(f"cannot write {out}: {e.strerror or e}") from e
        finally:
            if tmp.exists():
                tmp.unlink()


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write in ``directory``'s file system."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


class NoRoomError(OSError):
    """A write refused before it started: the file is as it was before."""


def make_room(path: Path, needed: int) -> None:
    """Refuse a write of ``needed`` bytes (plus :data:`SPACE_MARGIN`) that the disk has no room for,
    before it starts: HDF5 cannot take back a write that fails half-way, which can leave a file
    that neither closes nor opens."""
    parent = path.parent if str(path.parent) else Path(".")
    if free_bytes(parent) < needed + SPACE_MARGIN:
        raise NoRoomError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def write_nowhere(fd: int) -> None:
    """Point ``fd`` at /dev/null: what is still written through it succeeds and goes nowhere."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, fd)
    os.close(null)


def write_failure(e: BaseException) -> str:
    """Why a write failed, in a few words (h5py puts the OS's message inside a long one)."""
    found = re.search(r"error message = '([^']*)'", str(e))
    return found.group(1) if found else getattr(e, "strerror", None) or first_line(e)


def lock_path(path: Path) -> Path:
    """The lock file (``.NAME.lock``, beside it) every writer of ``path`` holds."""
    return path.with_name(f".{path.name}.lock")


class OutputLock:
    """The exclusive right to write ``path`` (and its temporary ``.NAME.partial``) in this process.

    Taken with :meth:`acquire`, which fails at once (:class:`StoreError` naming the process that
    holds it) rather than waiting; held until :meth:`release`.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: str | Path) -> OutputLock:
        path = Path(path)
        where = lock_path(path)
        while True:
            try:
                fd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise StoreError(f"cannot write {clip(str(path))}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise StoreError(
                    f"{clip(str(path))} is being written by process {holder}; wait for it to end or choose another --output"
                ) from None
            if _same_file(fd, where):
                break
            os.close(fd)  # the holder released it and removed the file as it was opened: try the new one
        lock = cls(path, fd)
        lock._write_pid()
        return lock

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def _write_pid(self) -> None:
        """Our PID in the lock file, for the message another writer gets (best effort: a full disk
        may refuse even these few bytes, and the lock holds without them)."""
        assert self._fd is not None
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Remove the lock file, then unlock: one waiting to lock the removed file sees that it is
        gone. Releasing twice is harmless (the lock's users may each release it)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._fd, lock_path(self.path)):
                lock_path(self.path).unlink()
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    return pid if pid.isdigit() else "(unknown)"


def _same_file(fd: int, where: Path) -> bool:
    """Whether ``where`` still names the file open as ``fd`` (a lock on a removed file locks nothing)."""
    try:
        st = os.stat(where)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, then take effect as they would have: a
    Ctrl-C in the middle of a flush would leave datasets of different lengths. Outside the main
    thread (where Python runs signal handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(sig: int, _frame: FrameType | None) -> None:
        received.append(sig)

    # a handler not set from Python (getsignal: None) cannot be put back, so that signal is left as it is
    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not None}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])  # to the handler that was there before, now restored
