"""A new file whose size a stored file has: hashed beside its inspection, then copied once."""

from __future__ import annotations

import hashlib
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


def test_a_same_size_file_is_hashed_while_it_is_inspected_and_stored_whole(tmp_path, monkeypatch) -> None:
    first, second = _lora(tmp_path / "a.safetensors", 1), _lora(tmp_path / "b.safetensors", 2)
    assert first.stat().st_size == second.stat().st_size
    reg = Registry.open(tmp_path / "registry")
    assert len(reg.add([first]).added) == 1

    inspecting, hashed = threading.Event(), []
    inspect_file, sha256_file = ingest.inspect_file, ingest.sha256_file

    def inspect_flagged(*args, **kwargs):
        inspecting.set()
        return inspect_file(*args, **kwargs)

    def hash_after_inspection_began(path):  # serial hashing (hash, then inspect) would time out
        hashed.append(inspecting.wait(timeout=20))
        return sha256_file(path)

    monkeypatch.setattr(ingest, "inspect_file", inspect_flagged)
    monkeypatch.setattr(ingest, "sha256_file", hash_after_inspection_began)
    report = reg.add([second])
    assert hashed == [True] and len(report.added) == 1 and not report.duplicates
    row = reg.get(report.added[0]["lora_id"])
    blob = reg.root / row["blob"]
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == row["sha256"]
    assert blob.read_bytes() == second.read_bytes()
    assert not list((reg.root / "blobs").glob(".incoming-*"))


def test_a_moved_duplicate_is_not_copied(tmp_path, monkeypatch) -> None:
    """The same bytes at a new path: recorded as a duplicate, no blob copy made or left."""
    first = _lora(tmp_path / "a.safetensors", 1)
    reg = Registry.open(tmp_path / "registry")
    lora_id = reg.add([first]).added[0]["lora_id"]
    moved = tmp_path / "moved" / "a.safetensors"
    moved.parent.mkdir()
    moved.write_bytes(first.read_bytes())
    monkeypatch.setattr(type(reg.blobs), "stage", lambda *a: pytest.fail("a duplicate was staged"))
    report = reg.add([moved])
    assert report.duplicates == [{"path": str(moved), "lora_id": lora_id, "kind": "sha256"}]
    assert not list((reg.root / "blobs").glob(".incoming-*"))
