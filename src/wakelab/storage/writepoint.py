"""Named write points: a full disk or an I/O error inside one becomes one line that says what is safe and what next.

Every place wakelab writes a user's files (a checkpoint, ``final/``, the logged model, a mirror, an export, ...) runs
inside ``with write_point(NAME, PATH, intact=..., then=...)``. Should the operating system refuse the write for
want of space or because the device failed (ENOSPC, EDQUOT, EIO, EROFS), the block raises :class:`WriteFailed`,
whose message is the one line the CLI prints::

    disk full writing runs/demo/.staging/checkpoint-4/optimizer.pt (checkpoint-4); the last complete checkpoint
    runs/demo/checkpoint-2 (step 2) is intact, nothing half-written was published; free space, then: wakelab resume
    runs/demo

One mechanism, not a copy at every site: the sites only say what they write, what a failure leaves intact and the
command that continues. The run's engine turns the error into a FAILED MLflow run with the line as its
``wakelab.error`` tag, like any other ``WakelabError``; the exit status is 4, so scripts tell a full disk from bad
input (2) and a tracking store that went away (3).

The error is found in the exception chain by its errno, and by its text where a library reports it as a string
(safetensors' Rust writer says "No space left on device (os error 28)", torch's zip writer "file write failed").

Tests inject the error at any named point without filling a disk: with ``WAKELAB_FAULT_AT=NAME[:N]`` set (and
``WAKELAB_FAULT_ERRNO=EIO`` for an I/O error rather than a full disk), the N-th time the process reaches ``NAME`` it
raises ``OSError`` there. The names are those of the write points, of :mod:`wakelab.storage.crashpoint`'s moments (which
call :func:`maybe_fail` too), and ``publish-file`` / ``publish-dir``: a file or folder written whole, not yet renamed
into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import WakelabError
from .durable import fsync_dir

ENV_AT = "WAKELAB_FAULT_AT"
ENV_ERRNO = "WAKELAB_FAULT_ERRNO"

#: The errors that mean "the disk cannot take this write", in the words the line uses.
DISK_ERRORS: dict[int, str] = {
    errno.ENOSPC: "disk full",
    errno.EIO: "I/O error",
    errno.EROFS: "read-only file system",
}
if hasattr(errno, "EDQUOT"):
    DISK_ERRORS[errno.EDQUOT] = "disk quota exceeded"
#: How libraries that do not raise OSError report the same errors in their messages.
_TEXT_ERRORS = [
    (re.compile(r"No space left on device|os error 28\b"), errno.ENOSPC),
    (re.compile(r"Disk quota exceeded|os error 122\b"), getattr(errno, "EDQUOT", errno.ENOSPC)),
    (re.compile(r"Input/output error|os error 5\b"), errno.EIO),
    (re.compile(r"Read-only file system|os error 30\b"), errno.EROFS),
]

_reached: dict[str, int] = {}

Text = str | Callable[[], str] | None


class WriteFailed(WakelabError):
    """The disk refused a write (full, quota, I/O error, read-only). The message names the file, what is intact
    and the command to continue; ``errno`` is the error, ``point`` the write point's name."""

    exit_code = 4

    def __init__(self, message: str, *, point: str, path: Path, errno_: int):
        super().__init__(message)
        self.point = point
        self.path = path
        self.errno = errno_


def disk_errno(exc: BaseException | None) -> int | None:
    """The disk error (ENOSPC, EDQUOT, EIO, EROFS) behind ``exc``, searched along its causes; None if none is."""
    seen = 0
    while exc is not None and seen < 20:
        seen += 1
        if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
            return exc.errno
        if not isinstance(exc, OSError) or exc.errno is None:
            text = str(exc)
            for pattern, number in _TEXT_ERRORS:
                if pattern.search(text):
                    return number
        exc = exc.__cause__ or exc.__context__
    return None


def _failed_file(exc: BaseException, default: Path) -> Path:
    """The file the OS named in the error (the first along the chain); else, when the write point is a folder, the
    file last written in it (safetensors' and torch's writers name none: the one they were writing is the newest);
    else the write point's own path."""
    seen = 0
    while exc is not None and seen < 20:
        seen += 1
        if isinstance(exc, OSError) and exc.filename:
            return Path(exc.filename)
        exc = exc.__cause__ or exc.__context__
    try:
        written = [p for p in default.rglob("*") if p.is_file()] if default.is_dir() else []
        return max(written, key=lambda p: p.stat().st_mtime_ns) if written else default
    except OSError:
        return default


def _text(value: Text) -> str:
    if callable(value):
        try:
            return value()
        except Exception:  # noqa: BLE001 - the line must come out even when describing what is intact fails
            return ""
    return value or ""


def message(number: int, path: Path, what: str | None, intact: str, then: str) -> str:
    """The one line: what happened to which file, what is intact, and the command that continues."""
    line = f"{DISK_ERRORS.get(number, os.strerror(number))} writing {path}"
    if what:
        line += f" ({what})"
    line += f"; {intact}" if intact else ""
    line += (
        f"; free space (or mend the disk), then: {then}" if then else "; free space (or mend the disk) and run it again"
    )
    return " ".join(line.split())


@contextlib.contextmanager
def write_point(
    name: str, path: str | os.PathLike, *, what: str | None = None, intact: Text = None, then: Text = None
) -> Iterator[None]:
    """Run the block as write point ``name`` writing ``path``; a disk error inside it raises :class:`WriteFailed`.

    ``intact`` (what a failure here leaves whole) and ``then`` (the command to continue) may be callables, worked
    out only when the write fails (the last complete checkpoint is known then). A ``WriteFailed`` from a write point
    nested inside passes through unchanged: the innermost knows best.
    """
    path = Path(path)
    try:
        maybe_fail(name, path)
        yield
    except WriteFailed:
        raise
    except BaseException as exc:
        number = disk_errno(exc)
        if number is None:
            raise
        line = message(number, _failed_file(exc, path), what, _text(intact), _text(then))
        raise WriteFailed(line, point=name, path=path, errno_=number) from exc


def arrived(env: str, name: str, counts: dict[str, int]) -> bool:
    """True at the arrival a test named in ``$env`` (``NAME`` or ``NAME:N``, the Nth time ``name`` is reached);
    counts every arrival at the named point in ``counts``. Shared by the crash points and the injected faults."""
    target = os.environ.get(env)
    if not target:
        return False
    wanted, _, nth = target.partition(":")
    if wanted != name:
        return False
    counts[name] = counts.get(name, 0) + 1
    return counts[name] == int(nth or 1)


def maybe_fail(name: str, path: str | os.PathLike | None = None) -> None:
    """Raise the injected disk error if a test asked for it at this point (see the module docstring)."""
    if not arrived(ENV_AT, name, _reached):
        return
    number = getattr(errno, os.environ.get(ENV_ERRNO) or "ENOSPC")
    raise OSError(number, os.strerror(number), None if path is None else str(path))


# -- publishing a file or folder whole, or not at all -------------------------------------------------------------


@contextlib.contextmanager
def published_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary name beside ``path``; once the block has written it, rename it to ``path``.

    A failure (a full disk half-way) removes the temporary file: ``path`` is whole (the new file or the one before
    it) or absent, never half-written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        maybe_fail("publish-file", tmp)  # written, not yet in place
        if tmp.is_file():
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def published_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; once the block has filled it, it replaces ``path`` by renames.

    As :func:`published_file`, for a folder (a tokenizer, an exported model): whole or absent. An existing ``path``
    is renamed aside first and deleted only once the new folder is in (as ``checkpoints.publish_dir`` does).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        maybe_fail("publish-dir", tmp)  # filled, not yet in place
        aside = None
        if path.exists():
            aside = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, aside)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
