"""The file hash: every byte, whether the file is mapped or read."""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import pytest

from registry import hashing
from registry.hashing import file_chunks, sha256_file
from registry.store import blob_copy
from registry.store.blobstore import BlobStore

SIZES = [0, 1, 4095, 4096, hashing.CHUNK, 2 * hashing.CHUNK + 4097]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mapped", [True, False])
def test_sha256_and_blob_copy_see_every_byte_mapped_or_read(tmp_path: Path, monkeypatch,
                                                            size: int, mapped: bool) -> None:
    if not mapped:  # e.g. a special file: mmap refuses it, the bytes are read instead
        monkeypatch.setattr(hashing.mmap, "mmap", _refusing_mmap)
    data = os.urandom(size)
    source = tmp_path / "lora.safetensors"
    source.write_bytes(data)
    assert sha256_file(source) == hashlib.sha256(data).hexdigest()
    store = BlobStore(tmp_path / "blobs")
    sha, staged = store.stage(source)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.commit(staged, sha).read_bytes() == data


def _refusing_mmap(*args, **kwargs):
    raise OSError(19, "No such device")


def test_a_map_is_closed_when_the_reader_stops_early(tmp_path: Path, monkeypatch) -> None:
    """An exception half-way through raises no BufferError, and the map holds no view of its own
    afterwards (it is unmapped once the caller's views are gone)."""
    maps: list[mmap.mmap] = []
    real = mmap.mmap
    monkeypatch.setattr(hashing.mmap, "mmap", lambda *a, **k: maps.append(real(*a, **k)) or maps[-1])
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3 * hashing.CHUNK))
    with pytest.raises(KeyError):
        with file_chunks(source) as chunks:
            for view in chunks:
                assert len(view) == hashing.CHUNK
                raise KeyError("stop")
    view.release()
    maps[0].close()  # BufferError if the reader still held a view of it


def test_blob_copy_writes_from_the_map_in_chunks(tmp_path: Path) -> None:
    """Chunks start page-aligned (as O_DIRECT needs) and the copy keeps the byte order."""
    data = os.urandom(blob_copy.COPY_CHUNK * 2 + 10)
    source = tmp_path / "lora.safetensors"
    source.write_bytes(data)
    with file_chunks(source, blob_copy.COPY_CHUNK) as chunks:
        sizes = [len(v) for v in chunks]
    assert sizes == [blob_copy.COPY_CHUNK, blob_copy.COPY_CHUNK, 10]
    assert blob_copy.COPY_CHUNK % blob_copy.ALIGN == 0
