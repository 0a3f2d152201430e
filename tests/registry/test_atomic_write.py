"""registry.atomic_write: small files land whole or not at all, and no temp file is left behind."""

from __future__ import annotations

import os
import stat

import pytest

from registry import atomic_write
from registry.atomic_write import copy_atomically, write_atomically


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_text_and_bytes_land_whole(tmp_path):
    target = tmp_path / "card.json"
    write_atomically(target, '{"name": "ünïcode"}')
    assert target.read_text(encoding="utf-8") == '{"name": "ünïcode"}'
    write_atomically(target, b"\x00\x01binary")  # replaces the old content
    assert target.read_bytes() == b"\x00\x01binary"
    write_atomically(str(target), "")  # a str path, empty content
    assert target.read_bytes() == b""
    assert _names(tmp_path) == ["card.json"]


def test_a_str_that_cannot_be_encoded_leaves_the_old_file(tmp_path):
    target = tmp_path / "cursor.json"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(UnicodeEncodeError):
        write_atomically(target, "\ud800 lone surrogate")
    with pytest.raises(UnicodeEncodeError):
        write_atomically(target, "é", encoding="ascii")
    assert target.read_text(encoding="utf-8") == "old" and _names(tmp_path) == ["cursor.json"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failure_mid_write_removes_the_temp_file(tmp_path, monkeypatch, failing):
    target = tmp_path / "format.json"
    target.write_text("old", encoding="utf-8")
    seen = []

    def boom(*args):
        seen.append([p for p in _names(tmp_path) if p != "format.json"])  # the temp file exists by now
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_write.os, failing, boom)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, "new content")
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith(".format.json.")
    assert seen[0][0].endswith(".tmp")
    assert target.read_text(encoding="utf-8") == "old" and _names(tmp_path) == ["format.json"]


def test_a_missing_folder_raises_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomically(tmp_path / "no" / "such.json", "x")
    assert _names(tmp_path) == []


def test_temp_names_are_unique_per_call(tmp_path, monkeypatch):
    """Two writers of one target (threads of one process included) never share a temp file."""
    temps = []
    real_replace = os.replace

    def spy(src, dst):
        temps.append(os.fspath(src))
        real_replace(src, dst)

    monkeypatch.setattr(atomic_write.os, "replace", spy)
    for i in range(3):
        write_atomically(tmp_path / "same.json", str(i))
    assert len(set(temps)) == 3 and all(os.path.dirname(t) == str(tmp_path) for t in temps)
    assert (tmp_path / "same.json").read_text(encoding="utf-8") == "2"


def test_permissions_follow_the_umask_as_open_does(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomically(tmp_path / "a.json", "x")
        (tmp_path / "b.json").write_text("x", encoding="utf-8")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o644


def test_a_long_name_still_fits(tmp_path):
    target = tmp_path / ("n" * 250 + ".json")  # 255 bytes: the longest name most file systems allow
    write_atomically(target, "x")
    assert target.read_text(encoding="utf-8") == "x" and _names(tmp_path) == [target.name]


def test_registry_files_written_by_it_leave_no_temp_files(tmp_path):
    from registry import Registry
    from registry.lora.base_models import BaseModel

    reg = Registry.open(tmp_path / "reg")  # writes the registry.json marker
    reg.register_base(BaseModel("owner/mine", "flux", {"proj": (4, 4)}))
    reg.register_base(BaseModel("owner/mine", "flux", {"proj": (4, 4)}))  # rewritten in place
    with pytest.raises(ValueError, match="a different base named 'owner/mine' is already known"):
        reg.register_base(BaseModel("owner/mine", "flux", {"proj": (4, 8)}))  # not silently replaced
    with pytest.raises(ValueError, match="a different base named 'FLUX.1-dev'"):
        reg.register_base(BaseModel("FLUX.1-dev", "flux", {"proj": (4, 8)}))  # nor is a built-in
    assert _names(reg.root / "bases") == ["owner__mine.json"]
    assert not [p.name for p in reg.root.iterdir() if p.name.endswith(".tmp")]
    assert [b for b in reg.bases() if b.name == "owner/mine"][0] == BaseModel("owner/mine", "flux", {"proj": (4, 4)})
    assert Registry.open(tmp_path / "reg").base_names()[-1] == "owner/mine"  # the marker reads back


def test_a_copy_lands_whole_or_not_at_all(tmp_path, monkeypatch):
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(3 << 20))  # several copy chunks
    target = tmp_path / "out" / "enc.safetensors"
    target.parent.mkdir()
    copy_atomically(source, target)
    assert target.read_bytes() == source.read_bytes() and _names(target.parent) == ["enc.safetensors"]

    target.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        copy_atomically(source, target)
    assert target.read_bytes() == b"old" and _names(target.parent) == ["enc.safetensors"]
    with pytest.raises(FileNotFoundError):
        copy_atomically(tmp_path / "missing", target)
    assert _names(target.parent) == ["enc.safetensors"]
