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
