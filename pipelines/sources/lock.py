"""One sync of a downloading source at a time: an exclusive ``fcntl.flock`` on
``DOWNLOAD/.staging/SOURCE.lock``, held from reading the cursor to writing it back. A second sync of
that source (another ``autolora sync``, a Dagster run) waits for the first to finish, saying so once
through ``on_wait``, instead of racing it over the same ``.part`` files. The kernel drops the lock
when its holder exits, however it exits. Re-entrant within a thread (the CLI holds it around
:func:`pipelines.sources.sync.sync`, which takes it too)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ContextManager

from pipelines.sources.base import Source, safe_name

STAGING = ".staging"
_held: dict[tuple[str, int], int] = {}  # (lock file, thread) -> depth


def lock_path(download_dir: str | os.PathLike, source: str) -> Path:
    """The lock file of ``source`` under ``download_dir``."""
    return Path(download_dir) / STAGING / f"{safe_name(source)}.lock"


@contextmanager
def source_lock(download_dir: str | os.PathLike, source: str,
                on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``source``'s sync lock; when another process holds it, call ``on_wait`` with one line
    saying so, then wait for it."""
    path = lock_path(download_dir, source)
    key = (str(path.absolute()), threading.get_ident())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(f"{source}: another sync of this source is running (lock {path}); waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            fcntl.flock(handle, fcntl.LOCK_UN)


def sync_lock(source: Source, download_dir: str | os.PathLike,
              on_wait: Callable[[str], None] | None = None) -> ContextManager[None]:
    """What a caller holds around one sync of ``source`` (cursor read to cursor written): its
    :func:`source_lock`, or nothing for a source that syncs in place (it has no downloads to race over)."""
    if getattr(source, "in_place", False):
        return contextlib.nullcontext()
    return source_lock(download_dir, source.name, on_wait)
