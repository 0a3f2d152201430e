"""Telling the registry's own storage failing mid-ingest (a full disk, a folder gone read-only) from
a bad input file: the first stops the run with one clear error, the second is that file's rejection."""

from __future__ import annotations

import errno
import os

from registry.atomic_write import cannot_create_in
from registry.store.store import RegistryNotWritable, Store

# errors only a write can give: no source file being read raises them
_WRITE_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class RegistryWriteFailed(RegistryNotWritable):
    """The registry could not be written partway through an ingest. What was written before is whole
    (every table write is one atomic commit); the files of the batch in flight are not recorded, and
    an ingest run again once the registry can be written takes them up."""


def storage_problem(store: Store, error: BaseException) -> str:
    """Why ``error`` is the registry's storage failing (``""``: it is not, e.g. a source file that cannot
    be read). An OS error that only writes give says so itself; LanceDB's errors carry the OS error as
    Rust's ``std::io::Error`` prints it, "(os error N)"; otherwise the store's folders are tried."""
    code = getattr(error, "errno", None)
    if code in _WRITE_ONLY:
        return os.strerror(code)
    text = str(error)
    for code in _WRITE_ONLY:
        if f"(os error {code})" in text:
            return os.strerror(code)
    if not isinstance(error, (OSError, RuntimeError)):
        return ""
    for folder in (store.blobs.root, store.root / "lancedb"):
        why = cannot_create_in(folder)
        if why:
            return f"{folder}: {why}"
    return ""


def write_failed(store: Store, why: str, done: int, total: int) -> RegistryWriteFailed:
    """The error that stops an ingest whose registry could not be written."""
    return RegistryWriteFailed(
        f"cannot write to the registry at {store.root} ({why}); stopped with {done} of {total} files recorded: "
        "those are whole, and running the ingest again once it can be written takes up the rest")
