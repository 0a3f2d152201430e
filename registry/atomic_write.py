"""Small files written whole or not at all: a unique temp file beside the target, then ``os.replace``."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _temp_prefix(name: str) -> str:
    return f".{name[:200]}."


def is_temp_file_of(name: str, target_name: str) -> bool:
    """Whether ``name`` is the temp file of a write of ``target_name`` in progress (or killed) in the
    same folder."""
    return name.startswith(_temp_prefix(target_name)) and name.endswith(".tmp")


@contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A new hidden temp file beside ``path`` to write; flushed, fsynced and renamed over ``path``
    when the block ends, removed (``path`` untouched) when it raises. Permissions as a plain
    ``open(path, "w")`` gives (0o666 less the umask)."""
    target = Path(path)
    tmp = target.with_name(f"{_temp_prefix(target.name)}{uuid.uuid4().hex[:12]}.tmp")  # hidden; fits NAME_MAX
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike, data: bytes | str, encoding: str = "utf-8") -> None:
    """Write ``data`` (``str`` is encoded with ``encoding``) to ``path`` so that readers see the old
    content or the new, never a part; on any failure ``path`` is as it was and no temp file stays."""
    payload = data.encode(encoding) if isinstance(data, str) else data  # before anything touches the disk
    with _replacing(path) as handle:
        handle.write(payload)


def copy_atomically(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy the file ``source`` to ``path`` the same way: readers of ``path`` see the old file or
    the whole copy, and a failed copy leaves no temp file behind."""
    with open(source, "rb") as src, _replacing(path) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def cannot_create_in(folder: str | os.PathLike) -> str:
    """Why no file can be created in ``folder`` (``""`` when one can): tried with an unnamed temp
    file that leaves nothing behind, since permission bits do not bind root (a read-only mount does)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return ""
    except OSError as error:
        return str(error.strerror or error)
