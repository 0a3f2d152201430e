"""A new file whose size a stored file has: hashed beside its inspection, then copied once."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import pytest
from flux_fixtures import flux_lora, partial_names

import registry.ingest as ingest
from registry import Registry
from registry.lora.formats import save_lora


def _lora(path: Path, seed: int) -> Path:
    save_lora(path, flux_lora(partial_names((1,), (), attention_only=True), rank=2, seed=seed), "kohya")
    return path


@pytest.fixture(autouse=True)
def _small_files_copied_beside(monkeypatch) -> None:
    """These LoRAs are a few kB: treated as the large files the rule is for."""
    monkeypatch.setattr(ingest, "COPY_BESIDE_BYTES", 0)


def _stored_whole(reg: Registry, report, source: Path) -> None:
    """The added LoRA's blob holds the file's bytes, its sha256 as recorded; no staged copy is left."""
    row = reg.get(report.added[0]["lora_id"])
    blob = reg.root / row["blob"]
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == row["sha256"]
    assert blob.read_bytes() == source.read_bytes()
    assert not list((reg.root / "blobs").glob(".incoming-*"))


def _inspection_flagged(monkeypatch) -> threading.Event:
    inspecting, inspect_file = threading.Event(), ingest.inspect_file

    def inspect_flagged(*args, **kwargs):
        inspecting.set()
        return inspect_file(*args, **kwargs)

    monkeypatch.setattr(ingest, "inspect_file", inspect_flagged)
    return inspecting


def test_a_new_file_of_a_stored_size_is_copied_while_it_is_inspected(tmp_path, monkeypatch) -> None:
    """LoRAs of one shape often have one size: a new one is staged (hashed and copied in one
    pass) beside its inspection, not hashed first and copied after (fails on eb68fb1)."""
    first, second = _lora(tmp_path / "a.safetensors", 1), _lora(tmp_path / "b.safetensors", 2)
    assert first.stat().st_size == second.stat().st_size
    st = first.stat()  # files written within one clock tick share an mtime: this one is a second younger
    os.utime(second, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    reg = Registry.open(tmp_path / "registry")
    assert len(reg.add([first]).added) == 1

    inspecting, staged, stage = _inspection_flagged(monkeypatch), [], type(reg.blobs).stage

    def stage_after_inspection_began(self, path):  # serial work (stage, then inspect) would time out
        staged.append(inspecting.wait(timeout=20))
        return stage(self, path)

    monkeypatch.setattr(type(reg.blobs), "stage", stage_after_inspection_began)
    monkeypatch.setattr(type(reg.blobs), "put", lambda *a: pytest.fail("copied after hashing"))
    report = reg.add([second])
    assert staged == [True] and len(report.added) == 1 and not report.duplicates
    _stored_whole(reg, report, second)


def test_a_small_file_of_a_stored_size_is_hashed_first(tmp_path, monkeypatch) -> None:
    """Below ``COPY_BESIDE_BYTES`` a file of a stored size is only hashed beside its inspection
    (no mtime look-up) and copied once it is known to be new."""
    monkeypatch.setattr(ingest, "COPY_BESIDE_BYTES", 1 << 30)
    first, second = _lora(tmp_path / "a.safetensors", 1), _lora(tmp_path / "b.safetensors", 2)
    reg = Registry.open(tmp_path / "registry")
    assert len(reg.add([first]).added) == 1
    monkeypatch.setattr(type(reg.blobs), "stage", lambda *a: pytest.fail("a small file was staged"))
    report = reg.add([second])
    assert len(report.added) == 1
    row = reg.get(report.added[0]["lora_id"])
    assert (reg.root / row["blob"]).read_bytes() == second.read_bytes()


def test_a_file_of_a_stored_size_and_mtime_is_hashed_while_it_is_inspected_and_stored_whole(
        tmp_path, monkeypatch) -> None:
    """Same size and mtime as a stored file (as a moved copy has): hashed only, beside its
    inspection; when its bytes turn out new, copied once."""
    first, second = _lora(tmp_path / "a.safetensors", 1), _lora(tmp_path / "b.safetensors", 2)
    assert first.stat().st_size == second.stat().st_size
    reg = Registry.open(tmp_path / "registry")
    assert len(reg.add([first]).added) == 1
    st = first.stat()
    os.utime(second, ns=(st.st_atime_ns, st.st_mtime_ns))

    inspecting, hashed, sha256_file = _inspection_flagged(monkeypatch), [], ingest.sha256_file

    def hash_after_inspection_began(path):  # serial hashing (hash, then inspect) would time out
        hashed.append(inspecting.wait(timeout=20))
        return sha256_file(path)

    monkeypatch.setattr(ingest, "sha256_file", hash_after_inspection_began)
    report = reg.add([second])
    assert hashed == [True] and len(report.added) == 1 and not report.duplicates
    _stored_whole(reg, report, second)


def test_a_moved_duplicate_is_not_copied(tmp_path, monkeypatch) -> None:
    """The same bytes at a new path, moved there (its mtime kept): recorded as a duplicate, no
    blob copy made or left."""
    first = _lora(tmp_path / "a.safetensors", 1)
    reg = Registry.open(tmp_path / "registry")
    lora_id = reg.add([first]).added[0]["lora_id"]
    moved = tmp_path / "moved" / "a.safetensors"
    moved.parent.mkdir()
    shutil.copy2(first, moved)  # a move to another file system: the bytes and the mtime
    monkeypatch.setattr(type(reg.blobs), "stage", lambda *a: pytest.fail("a duplicate was staged"))
    report = reg.add([moved])
    assert report.duplicates == [{"path": str(moved), "lora_id": lora_id, "kind": "sha256"}]
    assert not list((reg.root / "blobs").glob(".incoming-*"))


def test_a_downloaded_again_duplicate_is_staged_and_its_copy_dropped(tmp_path) -> None:
    """The same bytes written anew (another mtime): staged like any new file, then told a
    duplicate by its sha256; its copy is not kept."""
    first = _lora(tmp_path / "a.safetensors", 1)
    reg = Registry.open(tmp_path / "registry")
    lora_id = reg.add([first]).added[0]["lora_id"]
    again = tmp_path / "downloads" / "a.safetensors"
    again.parent.mkdir()
    again.write_bytes(first.read_bytes())
    os.utime(again, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    report = reg.add([again])
    assert report.duplicates == [{"path": str(again), "lora_id": lora_id, "kind": "sha256"}]
    assert not report.added and len(reg) == 1
    assert len(list((reg.root / "blobs").rglob("*.safetensors"))) == 1
    assert not list((reg.root / "blobs").glob(".incoming-*"))
