"""A LoRA file rewritten in place while ingest reads it: the writer waits for the read (Linux read
lease), instead of truncating the file under ingest's memory maps (SIGBUS: the whole run died)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flux_fixtures import flux_lora, partial_names

import registry.ingest as ingest
from pipelines.cli import main
from registry import Registry
from registry.ingest.read_lease import BeingWritten, read_lease
from registry.lora.formats import save_lora

TRUNCATE = "import os, sys; os.truncate(sys.argv[1], 0)"  # as `cp new old` or a downloader rewriting it does


def _lora(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_lora(path, flux_lora(partial_names((seed % 19,), (), attention_only=True), rank=2, seed=seed), "diffusers")
    return path


def _leases_here(path: Path) -> bool:
    with read_lease(path) as held:
        return held


def test_a_truncation_waits_until_ingest_has_read_the_file(tmp_path, monkeypatch):
    victim = _lora(tmp_path / "in" / "victim.safetensors", 1)
    if not _leases_here(victim):
        pytest.skip("no read leases on this file system (or platform)")
    size, real = victim.stat().st_size, ingest.inspect_file
    writers = []

    def inspect_while_it_is_truncated(path, *args, **kwargs):
        writers.append(subprocess.Popen([sys.executable, "-c", TRUNCATE, str(path)]))
        time.sleep(0.5)  # the writer runs now, while the file is being read
        assert writers[0].poll() is None and Path(path).stat().st_size == size  # held back, the file whole
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ingest, "inspect_file", inspect_while_it_is_truncated)
    report = Registry.open(tmp_path / "registry").add([victim])
    assert len(report.added) == 1 and not report.rejected
    assert writers[0].wait(timeout=60) == 0 and victim.stat().st_size == 0  # then it went ahead


def test_a_file_open_for_writing_elsewhere_is_not_read_half_written(tmp_path, capsys):
    done, busy = _lora(tmp_path / "in" / "done.safetensors", 2), _lora(tmp_path / "in" / "busy.safetensors", 3)
    if not _leases_here(done):
        pytest.skip("no read leases on this file system (or platform)")
    writer = subprocess.Popen([sys.executable, "-c", f"import time; f = open({str(busy)!r}, 'ab'); time.sleep(60)"])
    try:
        deadline = time.time() + 30
        while time.time() < deadline:  # until the writer has it open
            try:
                _leases_here(busy)
            except BeingWritten:
                break
            time.sleep(0.05)
        report = Registry.open(tmp_path / "registry").add([tmp_path / "in"])
        inspected = main(["inspect", str(busy), "--json"])  # `autolora inspect` reads it under a lease too
        said = json.loads(capsys.readouterr().out)
    finally:
        writer.kill()
        writer.wait()
    assert inspected == 1 and said["code"] == "unreadable" and "open for writing by another process" in said["reason"]
    assert [e["path"] for e in report.added] == [str(done)]
    assert [(r["path"], r["code"]) for r in report.rejected] == [(str(busy), "unreadable")]
    assert "open for writing by another process" in report.rejected[0]["reason"]
    again = Registry.open(tmp_path / "registry").add([tmp_path / "in"])  # once it is closed: ingested
    assert [e["path"] for e in again.added] == [str(busy)]
