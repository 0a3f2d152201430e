"""Small files written whole or not at all: a unique temp file beside the target, then ``os.replace``."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def write_atomically(path: str | os.PathLike, data: bytes | str, encoding: str = "utf-8") -> None:
    """Write ``data`` (``str`` is encoded with ``encoding``) to ``path`` so that readers see the old
    content or the new, never a part: written to a unique temp file in the same folder, flushed and
    fsynced, then renamed over ``path``. On any failure the temp file is removed and ``path`` is as
    it was. The file gets the permissions a plain ``open(path, "w")`` would (0o666 less the umask)."""
    target = Path(path)
    payload = data.encode(encoding) if isinstance(data, str) else data  # before anything touches the disk
    tmp = target.with_name(f".{target.name[:200]}.{uuid.uuid4().hex[:12]}.tmp")  # hidden; fits NAME_MAX
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_atomically(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy the file ``source`` to ``path`` the same way: readers of ``path`` see the old file or
    the whole copy, and a failed copy leaves no temp file behind."""
    target = Path(path)
    tmp = target.with_name(f".{target.name[:200]}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(source, "rb") as src, open(tmp, "xb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
