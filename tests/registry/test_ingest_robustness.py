"""Ingest survives SIGKILL mid-folder and concurrent writers without duplicates or losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flux_fixtures import flux_lora, partial_names

from registry.lora.formats import save_lora
from registry import Registry

N_FILES = 40


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("zoo") / "loras"
    for i in range(N_FILES):
        layers = flux_lora(partial_names((i % 19,), (), attention_only=True), rank=2, seed=100 + i)
        sub = folder / f"part{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        save_lora(sub / f"lora_{i:03d}.safetensors", layers, ("diffusers", "kohya", "comfyui")[i % 3])
    return folder


def _ingest_cmd(registry: Path, *paths: Path, batch: int = 4) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "ingest", *map(str, paths), "--registry", str(registry),
            "--batch-size", str(batch), "--json"]


def _snapshot(path: Path) -> dict:
    reg = Registry.open(path)
    loras = reg.loras.to_arrow().drop_columns(["added_at"]).to_pylist()
    files = reg.files.to_arrow().drop_columns(["seen_at"]).to_pylist()
    ids = [r["lora_id"] for r in loras]
    assert len(ids) == len(set(ids)), "duplicate lora_id rows"
    for row in loras:
        assert (reg.root / row["blob"]).is_file()
        row.pop("text_vector")
    return {"loras": sorted(loras, key=lambda r: r["lora_id"]),
            "files": sorted(files, key=lambda r: r["sha256"])}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def test_sigkill_mid_ingest_then_rerun_equals_uninterrupted(lora_folder, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(_ingest_cmd(reference, lora_folder), check=True, env=_env(), capture_output=True)

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(_ingest_cmd(crashed, lora_folder), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once a quarter of the files have been stored
        if proc.poll() is not None:
            break
        blobs = crashed / "blobs"
        if blobs.is_dir() and sum(1 for _ in blobs.rglob("*.safetensors")) >= N_FILES // 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "ingest finished before it could be killed"
    partial = len(Registry.open(crashed))
    assert partial < N_FILES

    rerun = subprocess.run(_ingest_cmd(crashed, lora_folder), check=True, env=_env(), capture_output=True)
    report = json.loads(rerun.stdout)
    assert not report["rejected"]
    assert _snapshot(crashed) == _snapshot(reference)
    assert len(Registry.open(crashed)) == N_FILES


def test_a_rerun_after_a_kill_between_the_rows_and_the_file_records_reports_no_duplicates(lora_folder, tmp_path):
    """Killed after a batch's LoRA rows were written and before their file records: the rerun finds
    each such file's own row, records the file, and reports it unchanged (it said "a duplicate" of
    itself before), with the tables as an uninterrupted run leaves them."""
    from registry.store.store import where_in

    reg = Registry.open(tmp_path / "registry")
    reg.add([lora_folder / "part0"])
    cut = sorted(r["path"] for r in reg.column_rows(reg.files, ["path"]))[:3]
    reg.files.delete(where_in("path", cut))  # what the kill left: rows without their file records
    again = Registry.open(tmp_path / "registry").add([lora_folder / "part0"])
    assert not again.duplicates and not again.added and not again.rejected
    assert sorted(os.path.realpath(e["path"]) for e in again.unchanged) == sorted(
        r["path"] for r in reg.column_rows(reg.files, ["path"]))
    assert sorted(r["path"] for r in reg.column_rows(reg.files, ["path"])) == sorted(
        str(p.resolve()) for p in (lora_folder / "part0").glob("*.safetensors"))
    third = reg.add([lora_folder / "part0"])
    assert len(third.unchanged) == N_FILES // 2 and not third.duplicates


def test_concurrent_overlapping_ingests_leave_no_duplicates(lora_folder, tmp_path):
    registry = tmp_path / "shared"
    Registry.open(registry)  # tables exist before the race, as in a running deployment
    procs = [subprocess.Popen(_ingest_cmd(registry, *paths, batch=3), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
             for paths in ((lora_folder,), (lora_folder / "part1", lora_folder / "part0"))]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    snap = _snapshot(registry)
    assert len(snap["loras"]) == N_FILES
    assert len(snap["files"]) == N_FILES
    added = [e["lora_id"] for out in outputs for e in json.loads(out[0])["added"]]
    assert sorted(added) == sorted(r["lora_id"] for r in snap["loras"])  # each reported added once


def test_a_registry_inside_an_ingested_folder_is_not_ingested(lora_folder, tmp_path):
    """Its blobs are copies of LoRAs it holds: walking into it would record them as duplicates
    whose paths are the registry's own (never gone, so never pruned)."""
    import shutil

    folder = tmp_path / "collection"
    shutil.copytree(lora_folder, folder)
    reg = Registry.open(folder / "registry")
    first = reg.add([folder])
    again = reg.add([folder])
    assert first.added and not first.duplicates and not again.duplicates and not again.added
    assert any(w.startswith(f"skipped {folder / 'registry'}: an autolora registry") for w in again.warnings)
    assert not any(str(folder / "registry") in r["path"] for r in reg.column_rows(reg.files, ["path"]))


@pytest.mark.parametrize("other_format", ["diffusers", "kohya"])
def test_a_lora_a_concurrent_ingest_stored_first_is_reported_as_its_duplicate(tmp_path, monkeypatch, other_format):
    """Both ingests look the LoRA up, find nothing, and write; the upsert keeps the first row, and
    the second ingest reports its file as a duplicate of that row (it said "added" before)."""
    import registry.ingest as ingest

    layers = flux_lora(partial_names((3,), (), attention_only=True), rank=2, seed=7)
    ours, theirs = tmp_path / "ours" / "x.safetensors", tmp_path / "theirs" / "x.safetensors"
    for path, fmt in ((ours, "diffusers"), (theirs, other_format)):
        path.parent.mkdir()
        save_lora(path, layers, fmt)
    reg, other = Registry.open(tmp_path / "registry"), Registry.open(tmp_path / "registry")
    flush, raced = ingest.Batch.flush, []

    def the_other_writes_first(batch):  # between our look-up and our write
        if batch.loras and not raced:
            raced.append(None)
            raced[0] = other.add([theirs])
        flush(batch)

    monkeypatch.setattr(ingest.Batch, "flush", the_other_writes_first)
    report = reg.add([ours])
    assert [e["path"] for e in raced[0].added] == [str(theirs)]
    lora_id = raced[0].added[0]["lora_id"]
    kind = "sha256" if other_format == "diffusers" else "fingerprint"
    assert not report.added and report.duplicates == [{"lora_id": lora_id, "path": str(ours), "kind": kind}]
    assert len(reg) == 1 and {f["path"] for f in reg.paths_of(lora_id)} == {str(ours), str(theirs)}
