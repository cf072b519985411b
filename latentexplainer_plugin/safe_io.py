"""Writing (and re-reading) the project's own files without following links or blocking on pipes.

Every file the project writes under ``--out`` and in the response cache goes through here:

- a new file is first written to a temp file next to it, created with ``O_CREAT | O_EXCL |
  O_NOFOLLOW`` under a unique name (``.NAME.<pid>.<random>.tmp``), fsynced, then renamed over the
  target; the temp file is removed on every exit path (errors, KeyboardInterrupt, SystemExit);
- the target, when it exists, must be a regular file: a symbolic link (which could point anywhere,
  e.g. outside the run directory), a FIFO, a device, a socket or a directory in its place is refused
  with :class:`UnsafePathError` and left untouched;
- folders the project creates inside a run directory (``strips/``, ``heatmaps/``) must be real
  folders, not links;
- every file gets one mode: :data:`FILE_MODE` (0o666) less the process umask, applied by the OS
  at creation (0o644 under the usual umask 022).

Reading goes through :func:`read_text`: ``O_NOFOLLOW | O_NONBLOCK`` and a regular-file check on
the open descriptor, so a link or a FIFO planted where results.json or a cache entry should be is
an error instead of a read of another file or a hang.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from .errors import UnsafePathError  # noqa: F401 (re-exported)

__all__ = ["FILE_MODE", "UnsafePathError", "atomic_writer", "atomic_write_bytes", "atomic_write_text",
           "check_target", "ensure_dir", "open_regular", "read_text", "temp_name"]

FILE_MODE = 0o666  # less the umask, as for any file a program creates with open()
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_BINARY = getattr(os, "O_BINARY", 0)


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, words in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return words
    return "a special file"


def check_target(path: str | Path) -> bool:
    """Raise :class:`UnsafePathError` unless ``path`` is missing or a regular file (links are not
    followed); True when it exists."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    kind = _kind(st.st_mode)
    if kind is not None:
        raise UnsafePathError(path, kind)
    return True


def ensure_dir(path: str | Path) -> Path:
    """Create folder ``path`` (one level) when missing; refuse a link or a file in its place."""
    path = Path(path)
    try:
        path.mkdir(exist_ok=True)
    except FileExistsError:
        pass  # a file in the way: reported below
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(path, _kind(st.st_mode) or "a regular file")
    return path


def temp_name(path: str | Path) -> Path:
    """A unique temp file name next to ``path``: ``.NAME.<pid>.<random>.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _create_temp(path: Path) -> tuple[int, Path]:
    for _ in range(100):
        tmp = temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, FILE_MODE)
        except FileExistsError:
            continue
        return fd, tmp
    raise FileExistsError(errno.EEXIST, f"could not create a unique temp file next to {path}")


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file object whose content replaces ``path`` when the block ends without error.

    Readers see the old file or the new one, never a partial one. On any exception (including
    KeyboardInterrupt) the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    check_target(path)  # refuse before any work is done
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        check_target(path)  # again: something may have been planted while we wrote
        os.replace(tmp, path)  # rename never follows a link at the target: it would replace the link itself
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically; the text is encoded before the temp file is made, so an
    unencodable string leaves nothing behind."""
    atomic_write_bytes(path, text.encode(encoding))


def open_regular(path: str | Path, flags: int = os.O_RDONLY, mode: int = FILE_MODE) -> int:
    """``os.open`` that does not follow a final link, does not block on a FIFO, and refuses anything
    but a regular file (the descriptor is closed then); the caller closes the returned descriptor."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | _BINARY, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise UnsafePathError(path, "a symbolic link") from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # ENXIO: a FIFO opened for writing with no reader
            check_target(path)
        raise
    try:
        kind = _kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise UnsafePathError(path, kind)
        if _NONBLOCK and hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """The text of regular file ``path``; a link or special file raises :class:`UnsafePathError`."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        return f.read().decode(encoding)
