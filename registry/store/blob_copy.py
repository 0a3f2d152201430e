"""Copy a file into the blob store while hashing it, without filling the page cache.

A blob is written once and read rarely, so where the file system allows it (Linux, not tmpfs) its
pages are written with ``O_DIRECT``: straight to the disk, not into the page cache as dirty pages
that the kernel must later write back, and that throttle the writer once they pile up. On the
2-core dev VM (ext4), copying a 170 MB file took 0.05-0.49 s buffered (``cp``, depending on how
much earlier writes were still being written back) and 0.07-0.12 s with ``O_DIRECT`` (``dd
oflag=direct``). The copy is pipelined: while one chunk is hashed (when asked) in this thread,
the previous ones are written by a second thread (``hashlib`` and ``os.pwrite`` release the GIL).

Written by hand: ``shutil.copyfile`` (sendfile / copy_file_range) always goes through the page
cache and cannot hash on the way, and no well-kept library does both.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor

ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffer addresses aligned to the block size
# Small chunks, several in flight: the write of a chunk overlaps the hashing of the next ones
# (60 MB, hashing alone 38-41 ms: 8 MB x 2 buffers took 61-66 ms, 1 MB x 2 took 45-48 ms).
COPY_CHUNK = 1 << 20
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
    buffers = [mmap.mmap(-1, COPY_CHUNK) for _ in range(IN_FLIGHT)]  # page-aligned, as O_DIRECT needs
    writes: list[Future | None] = [None] * IN_FLIGHT
    target = _Target(target_fd, target_path)
    try:
        with open(source, "rb", buffering=0) as handle, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="autolora-blob") as writer:
            offset, turn = 0, 0
            while True:
                if writes[turn] is not None:
                    writes[turn].result()  # this buffer's previous write is done
                n = handle.readinto(buffers[turn])
                if not n:
                    break
                view = memoryview(buffers[turn])[:n]
                writes[turn] = writer.submit(target.write_at, view, offset)
                if digest is not None:
                    digest.update(view)
                offset, turn = offset + n, (turn + 1) % IN_FLIGHT
            for write in writes:
                if write is not None:
                    write.result()
    finally:
        target.close_direct()
        os.close(target_fd)
