"""Keep a file from being truncated or rewritten while ingest reads it (Linux read leases).

Ingest reads a LoRA through memory maps (hashing, inspection): a file truncated under a map kills the
process with SIGBUS, which no Python code can catch, so a downloader or ``cp`` rewriting one file in
place would end the whole run. A read lease makes the kernel hold such a writer's ``open``/``truncate``
until the lease is let go (at most ``/proc/sys/fs/lease-break-time``, 45 s by default), which is right
after the file is read. The lease-break notice goes as SIGURG, whose default action is to ignore it,
so no signal handler is needed and any thread can take one. Written by hand: no library offers leases.

Where leases are unavailable (macOS, Windows, a network file system, a file this user neither owns nor
has CAP_LEASE for) the file is read unprotected, as before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

_LEASES = hasattr(fcntl, "F_SETLEASE") and hasattr(fcntl, "F_SETSIG")


class BeingWritten(OSError):
    """The file is open for writing by another process (a copy or download in progress)."""


@contextlib.contextmanager
def read_lease(path: str | os.PathLike) -> Iterator[bool]:
    """Hold a read lease on ``path`` for the block (yields whether one is held). Raises
    :class:`BeingWritten` when another process has the file open for writing: what would be read
    now may be half of it."""
    if not _LEASES:
        yield False
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # (a FIFO must not block here)
    except OSError:
        yield False  # the reader that follows says why the file cannot be read
        return
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as error:
            if error.errno == errno.EAGAIN:
                raise BeingWritten(errno.EAGAIN, "it is open for writing by another process (being copied "
                                                 "or downloaded?): ingest it again once that is done") from None
            yield False  # EACCES (not the owner), EINVAL (a file system without leases), ...
            return
        yield True
    finally:
        os.close(fd)  # lets the lease go
