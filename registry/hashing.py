"""Streaming sha256 of files: the one hash both halves of the registry use.

Files are read through a read-only memory map, chunk by chunk (``madvise(MADV_SEQUENTIAL)``
for read-ahead): hashing then reads the page cache in place instead of copying every byte into
a buffer first. For a 153 MB LoRA on the 2-core dev VM, warm: 89-91 ms against 94-102 ms with
``readinto``; cold (pages dropped): 102-112 ms against 158-383 ms. A file that cannot be mapped
(empty, or a special file) is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
from collections.abc import Iterator

CHUNK = 4 * 1024 * 1024  # a multiple of the page size, so every chunk starts page-aligned


@contextlib.contextmanager
def file_chunks(path: str | os.PathLike, chunk: int = CHUNK) -> Iterator[Iterator[memoryview]]:
    """The bytes of ``path`` as consecutive read-only views of at most ``chunk`` bytes.

    Views of a memory map, to be used inside the ``with`` block only (a file that cannot be
    mapped is read, a chunk at a time).
    """
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        try:
            mapped = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ) if size else None
        except (OSError, ValueError):
            mapped = None
        if mapped is None:
            yield _read_chunks(handle, chunk)
            return
    mapped.madvise(mmap.MADV_SEQUENTIAL)
    chunks = _mapped_chunks(mapped, size, chunk)
    try:
        yield chunks
    finally:
        chunks.close()
        try:
            mapped.close()
        except BufferError:  # a view still held somewhere: unmapped once the last one is gone
            pass


def _mapped_chunks(mapped: mmap.mmap, size: int, chunk: int) -> Iterator[memoryview]:
    whole = memoryview(mapped)
    for start in range(0, size, chunk):
        yield whole[start:start + chunk]


def _read_chunks(handle, chunk: int) -> Iterator[memoryview]:
    while data := handle.read(chunk):
        yield memoryview(data)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with file_chunks(path) as chunks:
        for view in chunks:
            digest.update(view)
    return digest.hexdigest()
