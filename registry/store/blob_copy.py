"""Copy a file into the blob store while hashing it, without filling the page cache.

A blob is written once and read rarely, so where the file system allows it (Linux, not tmpfs) its
pages are written with ``O_DIRECT``: straight to the disk, not into the page cache as dirty pages
that the kernel must later write back, and that throttle the writer once they pile up. On the
2-core dev VM (ext4), copying a 170 MB file took 0.05-0.49 s buffered (``cp``, depending on how
much earlier writes were still being written back) and 0.07-0.12 s with ``O_DIRECT`` (``dd
oflag=direct``). The copy is pipelined: while one chunk is hashed (when asked) in this thread,
the previous ones are written by a second thread (``hashlib`` and ``os.pwrite`` release the GIL).
The source is read through a memory map (:func:`registry.hashing.file_chunks`): chunks are
written from the page cache in place, never copied into a buffer first (153 MB, warm: 106-117
ms against 123-140 ms reading into two 1 MB buffers).

Written by hand: ``shutil.copyfile`` (sendfile / copy_file_range) always goes through the page
cache and cannot hash on the way, and no well-kept library does both.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from registry.hashing import file_chunks

ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffer addresses aligned to the block size
# Chunks of a few MB, two writes in flight: the write of a chunk overlaps the hashing of the
# next ones (153 MB from a map: 4 MB x 2 took 106-110 ms, 1 MB x 2 113-117, 1 MB x 4 111-115).
COPY_CHUNK = 4 << 20
IN_FLIGHT = 2


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class _Target:
    """A new file written at offsets: aligned spans through an ``O_DIRECT`` descriptor where the
    file system takes one, the rest (a file's unaligned tail, or everything) buffered."""

    def __init__(self, fd: int, path: str) -> None:
        self.buffered = fd
        self.direct: int | None = None
        flag = getattr(os, "O_DIRECT", 0)
        if flag:
            try:
                self.direct = os.open(path, os.O_WRONLY | flag)
            except OSError:  # e.g. tmpfs: EINVAL
                self.direct = None

    def write_at(self, view: memoryview, offset: int) -> None:
        n = len(view)
        aligned = n - n % ALIGN if self.direct is not None else 0
        if aligned:
            try:
                _pwrite_all(self.direct, view[:aligned], offset)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self.close_direct()  # this file system refuses direct writes after all
                aligned = 0
        if aligned < n:
            _pwrite_all(self.buffered, view[aligned:], offset + aligned)

    def close_direct(self) -> None:
        if self.direct is not None:
            os.close(self.direct)
            self.direct = None


def copy_into(source: str | os.PathLike, target_fd: int, target_path: str, digest: hashlib._Hash | None = None,
              ) -> None:
    """Copy ``source`` into the open, empty file ``target_fd`` (at ``target_path``) in one read pass,
    feeding every chunk to ``digest`` on the way when one is given. ``target_fd`` is closed."""
    target = _Target(target_fd, target_path)
    try:
        # the writer is shut down (every write done) before the source's map is closed
        with file_chunks(source, COPY_CHUNK) as chunks, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="autolora-blob") as writer:
            writes: deque[Future] = deque()
            offset = 0
            for view in chunks:
                writes.append(writer.submit(target.write_at, view, offset))
                if digest is not None:
                    digest.update(view)
                offset += len(view)
                while len(writes) > IN_FLIGHT:
                    writes.popleft().result()
            for write in writes:
                write.result()
    finally:
        target.close_direct()
        os.close(target_fd)
