"""The blob copy: every byte and the sha256 right for any size, direct I/O or not."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

import pytest

from registry.store import blob_copy
from registry.store.blobstore import BlobStore

SIZES = [0, 1, blob_copy.ALIGN - 1, blob_copy.ALIGN, 3 * blob_copy.COPY_CHUNK,
         5 * blob_copy.COPY_CHUNK + 4097]


@pytest.mark.parametrize("size", SIZES)
def test_stage_copies_and_hashes_every_byte(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    source = tmp_path / "source.safetensors"
    source.write_bytes(data)
    store = BlobStore(tmp_path / "blobs")
    sha, staged = store.stage(source)
    assert sha == hashlib.sha256(data).hexdigest()
    blob = store.commit(staged, sha)
    assert blob.read_bytes() == data
    assert not staged.exists()


def test_buffered_fallback_when_direct_io_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A file system that takes no O_DIRECT (tmpfs) still gets an exact copy."""
    data = os.urandom(2 * blob_copy.COPY_CHUNK + 123)
    source = tmp_path / "source.bin"
    source.write_bytes(data)

    monkeypatch.setattr(blob_copy.os, "pwrite", _refusing_direct(os.pwrite))
    fd, target = tempfile.mkstemp(dir=tmp_path)
    digest = hashlib.sha256()
    blob_copy.copy_into(source, fd, target, digest)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert Path(target).read_bytes() == data


def _refusing_direct(pwrite):
    """os.pwrite that fails with EINVAL on O_DIRECT descriptors, as tmpfs-like file systems do."""
    def fake(fd: int, data, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return pwrite(fd, data, offset)
    return fake


def test_put_copies_a_known_file(tmp_path: Path) -> None:
    data = os.urandom(blob_copy.COPY_CHUNK + 5)
    source = tmp_path / "render.png"
    source.write_bytes(data)
    store = BlobStore(tmp_path / "blobs")
    sha = hashlib.sha256(data).hexdigest()
    target = store.put(source, sha, ".png")
    assert target.read_bytes() == data and target.name.endswith(".png")
    assert store.put(source, sha, ".png") == target  # present: a no-op


def test_maintenance_removes_the_staged_copies_a_killed_ingest_left(tmp_path):
    import os
    import time

    from registry import Registry

    reg = Registry.open(tmp_path / "registry")
    blobs = tmp_path / "registry" / "blobs"
    old, fresh = blobs / ".incoming-killed", blobs / ".incoming-live"
    for path in (old, fresh):
        path.write_bytes(b"partial copy")
    day_ago = time.time() - 24 * 3600
    os.utime(old, (day_ago, day_ago))
    report = reg.maintain()
    assert report.stale_staging_removed == 1 and report.to_dict()["stale_staging_removed"] == 1
    assert not old.exists() and fresh.exists()  # a live ingest's copy is left alone


def test_explicit_maintenance_removes_lora_blobs_no_row_refers_to(tmp_path):
    import os
    import time

    from flux_fixtures import flux_lora, partial_names

    from registry import Registry
    from registry.lora.formats import save_lora

    (tmp_path / "in").mkdir()
    save_lora(tmp_path / "in" / "a.safetensors", flux_lora(partial_names((1,), (), attention_only=True), rank=2,
                                                           seed=1), "diffusers")
    reg = Registry.open(tmp_path / "registry")
    reg.add([tmp_path / "in"])
    kept = reg.root / reg.get(reg.lora_ids()[0])["blob"]
    day_ago = time.time() - 24 * 3600
    os.utime(kept, (day_ago, day_ago))
    folder = reg.root / "blobs" / "ff"
    folder.mkdir(exist_ok=True)
    orphan, fresh, render = folder / "f00d.safetensors", folder / "f11d.safetensors", folder / "f22d.png"
    for path in (orphan, fresh, render):
        path.write_bytes(b"x" * 10)
    for path in (orphan, render):
        os.utime(path, (day_ago, day_ago))
    assert reg.maintain().orphan_blobs_removed == 0 and orphan.exists()  # after an ingest: no walk
    report = reg.maintain(collect_blobs=True)
    assert (report.orphan_blobs_removed, report.orphan_bytes_freed) == (1, 10)
    assert not orphan.exists() and kept.exists() and fresh.exists() and render.exists()
    # a blob an ingest in flight reuses gets a fresh time, so it is not collected before its row lands
    reg.blobs.put(tmp_path / "in" / "a.safetensors", "f0" + "0" * 62)
    reused = reg.blobs.put(tmp_path / "in" / "a.safetensors", "f0" + "0" * 62)
    assert time.time() - reused.stat().st_mtime < 60


def test_maintenance_also_removes_copies_a_killed_put_left_beside_the_blobs(tmp_path):
    """Older ingests wrote a reused-size blob's temp file in its blob folder; explicit maintenance (the
    walk of every blob folder) finds those too, and a copy being written now goes to the root, where
    maintenance after every ingest looks."""
    import time

    from registry import Registry

    reg = Registry.open(tmp_path / "registry")
    folder = reg.blobs.root / "ab"
    folder.mkdir()
    old, fresh = folder / ".incoming-killed", folder / ".incoming-live"
    for path in (old, fresh):
        path.write_bytes(b"partial copy")
    day_ago = time.time() - 24 * 3600
    os.utime(old, (day_ago, day_ago))
    assert reg.maintain().stale_staging_removed == 0 and old.exists()  # after an ingest: no walk of the folders
    assert reg.maintain(collect_blobs=True).stale_staging_removed == 1 and not old.exists() and fresh.exists()

    seen = []
    real_copy = blob_copy.copy_into

    def watching(source, fd, tmp, *rest):
        seen.append(Path(tmp).parent)
        return real_copy(source, fd, tmp, *rest)

    source = tmp_path / "render.png"
    source.write_bytes(b"pixels")
    import registry.store.blobstore as blobstore

    original, blobstore.copy_into = blobstore.copy_into, watching
    try:
        reg.blobs.put(source, hashlib.sha256(b"pixels").hexdigest(), ".png")
    finally:
        blobstore.copy_into = original
    assert seen == [reg.blobs.root]


def test_a_blob_reused_while_maintenance_removes_it_stays_or_is_written_again(tmp_path, monkeypatch):
    """An ingest that reuses an unreferenced, old blob while maintenance removes it: whichever comes
    first, the blob is there afterwards (before, a row could name a blob maintenance had deleted)."""
    import time

    import registry.store.blobstore as blobstore

    store = BlobStore(tmp_path / "blobs")
    source = tmp_path / "lora.safetensors"
    source.write_bytes(b"weights" * 100)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    blob = store.put(source, sha)
    day_ago = time.time() - 24 * 3600

    # the ingest touches it just before maintenance renames it aside: maintenance puts it back
    os.utime(blob, (day_ago, day_ago))
    real_replace = os.replace

    def touched_first(src, dst):
        if Path(dst).name.startswith(blobstore.REMOVING):
            assert store.put(source, sha) == blob  # the ingest's reuse, in between
        return real_replace(src, dst)

    monkeypatch.setattr(blobstore.os, "replace", touched_first)
    assert store.remove_unreferenced(set()) == (0, 0)
    monkeypatch.setattr(blobstore.os, "replace", real_replace)
    assert blob.read_bytes() == source.read_bytes() and not list(blob.parent.glob(".removing-*"))

    # maintenance removes it between the ingest's look and its touch: the ingest writes it again
    real_utime = os.utime

    def removed_in_between(path, *args, **kwargs):
        if Path(path) == blob and blob.exists():
            os.unlink(blob)
        return real_utime(path, *args, **kwargs)

    monkeypatch.setattr(blobstore.os, "utime", removed_in_between)
    assert store.put(source, sha) == blob and blob.read_bytes() == source.read_bytes()
    staged_sha, staged = store.stage(source)
    assert store.commit(staged, staged_sha) == blob and blob.read_bytes() == source.read_bytes()
    monkeypatch.setattr(blobstore.os, "utime", real_utime)

    # no ingest: an old unreferenced blob goes; a removal cut short is undone by the next clean-up
    os.utime(blob, (day_ago, day_ago))
    assert store.remove_unreferenced(set()) == (1, len(source.read_bytes())) and not blob.exists()
    blob = store.put(source, sha)
    aside = blob.with_name(blobstore.REMOVING + blob.name)
    os.replace(blob, aside)
    store.remove_stale_staging(whole_store=True)
    assert blob.exists() and not aside.exists()
