"""What ingest does when something goes wrong that no file check foresaw: a failure one file
triggers is that file's rejection (recorded, the batch goes on), a path the tables cannot hold is
rejected by name, and a registry this process cannot write to is said once, before anything."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from flux_fixtures import flux_lora, partial_names

from pipelines.cli import main
from registry import Registry, RegistryNotWritable
from registry.lora.formats import save_lora


def _lora(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_lora(path, flux_lora(partial_names((seed % 19,), (), attention_only=True), rank=2, seed=seed), "diffusers")
    return path


def test_an_unforeseen_failure_on_one_file_is_its_rejection_and_the_batch_goes_on(tmp_path, monkeypatch):
    import registry.ingest as ingest

    good, bad = _lora(tmp_path / "in" / "good.safetensors", 1), _lora(tmp_path / "in" / "bad.safetensors", 2)
    real = ingest.inspect_file

    def flaky(path, *args, **kwargs):
        if Path(path).name == bad.name:
            raise TypeError("unhashable type: 'list'")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ingest, "inspect_file", flaky)
    reg = Registry.open(tmp_path / "registry")
    report = reg.add([tmp_path / "in"])
    assert [r["path"] for r in report.added] == [str(good)]
    assert report.rejected == [{"path": str(bad), "code": "internal_error", "reason":
                                "internal error while ingesting it (please report): TypeError: unhashable type: 'list'"}]
    stored = reg.rejections.to_arrow().to_pylist()
    assert [(r["path"], r["code"]) for r in stored] == [(os.path.realpath(bad), "internal_error")]


def test_a_path_that_is_not_utf8_is_rejected_by_name_and_the_rest_ingested(tmp_path):
    folder = tmp_path / "in"
    good = _lora(folder / "good.safetensors", 3)
    odd = os.fsdecode(os.fsencode(folder) + b"/caf\xe9.safetensors")
    _lora(Path(odd), 4)
    report = Registry.open(tmp_path / "registry").add([folder])
    assert [r["path"] for r in report.added] == [str(good)]
    assert report.rejected == [{"path": f"{folder}/caf\\xe9.safetensors", "code": "bad_name",
                                "reason": "the file's path is not valid UTF-8 (renaming it fixes that)"}]


def test_a_registry_that_cannot_be_written_is_said_once_before_anything(tmp_path, monkeypatch, capsys):
    lora = _lora(tmp_path / "in" / "a.safetensors", 5)
    reg = Registry.open(tmp_path / "registry")
    version = reg.version

    def refused(*args, **kwargs):  # as a read-only mount answers (root ignores permission bits)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    with pytest.raises(RegistryNotWritable, match="cannot write to the registry at .*Permission denied"):
        reg.add([lora])
    assert Registry.open(tmp_path / "registry").version == version
    assert main(["ingest", str(lora), "--registry", str(tmp_path / "registry")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autolora ingest: cannot write to the registry at ") and err.count("\n") == 1


def test_a_fifo_named_like_a_lora_in_a_folder_is_rejected_not_skipped_silently(tmp_path):
    folder = tmp_path / "in"
    good = _lora(folder / "good.safetensors", 6)
    os.mkfifo(folder / "pipe.safetensors")
    report = Registry.open(tmp_path / "registry").add([folder])
    assert [r["path"] for r in report.added] == [str(good)]
    assert report.rejected == [{"path": str(folder / "pipe.safetensors"), "code": "not_a_file",
                                "reason": "neither a regular file nor a folder"}]


def test_a_rejected_path_keeps_one_rejection_and_none_once_it_holds_a_lora(tmp_path):
    path = tmp_path / "in" / "a.safetensors"
    path.parent.mkdir()
    reg = Registry.open(tmp_path / "registry")

    def recorded() -> list[tuple[str, str]]:
        return [(r["path"], r["code"]) for r in reg.rejections.to_arrow().to_pylist()]

    path.write_bytes(b"")
    assert reg.add([path]).rejected[0]["code"] == "empty"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{nojson}")  # other bad bytes: its rejection replaces the first
    assert reg.add([path]).rejected[0]["code"] == "invalid_json"
    assert recorded() == [(os.path.realpath(path), "invalid_json")]
    _lora(path, 6)  # replaced by a good file: the rejection goes
    assert [r["path"] for r in reg.add([path]).added] == [str(path)]
    assert recorded() == []


def _no_space(after: int, real):
    """``real`` that fails as a full disk does from its ``after``-th call on."""
    import errno

    calls = []

    def copy(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return copy


def test_a_registry_filling_up_midway_stops_the_run_once_and_a_rerun_takes_up_the_rest(tmp_path, monkeypatch):
    """The disk holding the registry fills up partway: the run stops with one error naming the registry
    (before, every later file was rejected as an "internal error" and those rejections were recorded);
    the batches written before are whole, and a run once there is room records the rest."""
    import registry.store.blobstore as blobstore
    from registry import RegistryWriteFailed

    folder = tmp_path / "in"
    for i in range(7):
        _lora(folder / f"lora_{i}.safetensors", 10 + i)
    reg = Registry.open(tmp_path / "registry")
    monkeypatch.setattr(blobstore, "copy_into", _no_space(4, blobstore.copy_into))
    with pytest.raises(RegistryWriteFailed) as raised:
        reg.add([folder], batch_size=2)
    message = str(raised.value)
    assert message.startswith(f"cannot write to the registry at {reg.root} (No space left on device); stopped "
                              "with 4 of 7 files recorded") and "\n" not in message
    assert len(reg) == 4 and reg.rejections.count_rows() == 0
    monkeypatch.undo()
    again = reg.add([folder])
    assert len(again.added) == 3 and len(again.unchanged) == 4 and not again.rejected and len(reg) == 7


def test_a_table_write_failing_for_the_disk_stops_the_run_and_the_cli_says_it_in_one_line(tmp_path, monkeypatch,
                                                                                            capsys):
    """LanceDB's own write failing on the registry's storage (it reports the OS error in its message)
    is the same stop: the CLI exits 2 with one line, no traceback, nothing half-written."""
    from registry.store.store import Store

    folder = tmp_path / "in"
    for i in range(3):
        _lora(folder / f"lora_{i}.safetensors", 30 + i)
    Registry.open(tmp_path / "registry")

    def full(self, table, rows, key, *, update):
        if rows:
            raise RuntimeError("lance error: IO error: Generic LocalFileSystem error: Unable to write: "
                               "No space left on device (os error 28)")
        return 0

    monkeypatch.setattr(Store, "upsert", full)
    assert main(["ingest", str(folder), "--registry", str(tmp_path / "registry")]) == 2
    err = capsys.readouterr().err
    assert "cannot write to the registry at" in err and "stopped with 0 of 3 files recorded" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    monkeypatch.undo()
    reg = Registry.open(tmp_path / "registry")
    assert len(reg) == 0 and reg.files.count_rows() == 0 and not list(reg.blobs.root.glob(".incoming-*"))
    assert len(reg.add([folder]).added) == 3


def test_a_file_that_cannot_be_read_is_still_its_own_rejection(tmp_path, monkeypatch):
    """An I/O error reading a source file (the registry is fine) stays that file's rejection."""
    import errno

    import registry.store.blobstore as blobstore

    folder = tmp_path / "in"
    for i in range(3):
        _lora(folder / f"lora_{i}.safetensors", 40 + i)
    real = blobstore.copy_into

    def bad_sector(source, *args, **kwargs):
        if Path(source).name == "lora_1.safetensors":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(blobstore, "copy_into", bad_sector)
    report = Registry.open(tmp_path / "registry").add([folder])
    assert len(report.added) == 2 and [(r["code"], r["reason"]) for r in report.rejected] == [
        ("unreadable", "unreadable: Input/output error")]
