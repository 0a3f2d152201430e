"""Versions and maintenance: a pinned view pins every table and never writes; reading never
creates a registry; index maintenance beside a concurrent ingest loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flux_fixtures import flux_lora, partial_names

from registry import Registry, RegistryNotFound, VersionNotFound
from registry.lora.formats import save_lora

REPO = Path(__file__).resolve().parents[3]


def _folder(root: Path, n: int, offset: int = 0) -> Path:
    for i in range(offset, offset + n):
        path = root / f"lora_{i:03d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_lora(path, flux_lora(partial_names((i % 19,), (), attention_only=True), rank=2, seed=500 + i),
                  ("diffusers", "kohya", "comfyui")[i % 3])
    return root


def _state(reg: Registry) -> dict:
    return {name: sorted(map(lambda r: json.dumps(r, default=str), table.to_arrow().drop_columns(
        [c for c in ("text_vector",) if c in table.schema.names]).to_pylist()), key=str)
        for name, table in reg._tables().items()}


def test_a_pinned_view_pins_every_table_and_never_writes(tmp_path):
    reg = Registry.open(tmp_path / "registry")
    reg.add([_folder(tmp_path / "a", 3)])
    reg.tag("v1")
    number = reg.version
    snapshot = _state(reg)
    files_version = reg.files.version
    for i, pinned in enumerate((Registry.open(reg.root, version="v1"), Registry.open(reg.root, version=number))):
        reg.add([_folder(tmp_path / f"b{i}", 2, offset=10 + 2 * i)])  # writes continue meanwhile
        reg.maintain()
        assert _state(pinned) == snapshot and len(pinned) == 3
        assert {h.lora_id for h in pinned.search("lora", k=10)} <= {r["lora_id"] for r in pinned.loras.to_arrow().to_pylist()}
        with pytest.raises(PermissionError):
            pinned.add([tmp_path / "a"])
        with pytest.raises(PermissionError):
            pinned.tag("nope")
    assert reg.files.version > files_version and len(reg) == 7
    # the pinned views wrote nothing: no version of any table was made by opening them
    versions = {name: table.version for name, table in reg._tables().items()}
    Registry.open(reg.root, version="v1")
    reg2 = Registry.open(reg.root)
    assert {name: table.version for name, table in reg2._tables().items()} == versions


def test_a_version_number_pins_the_file_records_its_ingest_wrote(tmp_path):
    """An ingest writes its LoRA rows, then their file records: pinning the LoRA table's version
    after it (by number, no tag) shows both, for a first ingest and for a later one."""
    reg = Registry.open(tmp_path / "registry")
    for step, n in enumerate((2, 3)):
        reg.add([_folder(tmp_path / f"f{step}", n, offset=20 * step)])
        number, snapshot = reg.version, _state(reg)
        reg.add([_folder(tmp_path / f"g{step}", 1, offset=20 * step + 10)])  # later writes
        pinned = Registry.open(reg.root, version=number)
        assert _state(pinned) == snapshot and len(pinned.files.to_arrow()) == len(snapshot["files"])


def test_reading_never_creates_a_registry(tmp_path):
    for kwargs in ({"version": "prod"}, {"version": 3}, {"create": False}):
        with pytest.raises(RegistryNotFound, match="holds no autolora registry"):
            Registry.open(tmp_path / "typo", **kwargs)
    assert not (tmp_path / "typo").exists()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"jpg")
    with pytest.raises(RegistryNotFound, match="holds no autolora registry"):
        Registry.open(tmp_path / "photos")  # not a new registry inside someone's folder
    reg = Registry.open(tmp_path / "new")
    with pytest.raises(VersionNotFound, match="has no tag 'prod'; versions: "):
        Registry.open(reg.root, version="prod")
    for never in (99999, 0, -1):  # never existed: said so, not "cleaned up"
        with pytest.raises(VersionNotFound, match=rf"has no version {never}; versions: ") as caught:
            Registry.open(reg.root, version=never)
        assert "cleaned up" not in str(caught.value)


def test_maintenance_during_a_concurrent_ingest_loses_nothing(tmp_path, monkeypatch):
    from registry.store import maintenance

    monkeypatch.setattr(maintenance, "SCALAR_INDEX_MIN_ROWS", 10)  # this maintenance makes them all
    folder = _folder(tmp_path / "loras", 30)
    root = tmp_path / "registry"
    reg = Registry.open(root)
    reg.add([_folder(tmp_path / "seed", 2, offset=40)])  # tables and indexes exist
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ingest", str(folder), "--registry",
                             str(root), "--batch-size", "2", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs = 0
    while proc.poll() is None and runs < 200:  # maintenance again and again while it writes
        reg.maintain()
        runs += 1
        time.sleep(0.05)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert runs >= 2
    reg.maintain()
    report = json.loads(out)
    assert len(report["added"]) == 30 and not report["rejected"]
    assert len(reg) == 32 and reg.files.count_rows() == 32
    ids = reg.lora_ids()
    assert len(ids) == len(set(ids))
    for lora_id in ids:
        assert (reg.root / reg.get(lora_id)["blob"]).is_file()
    stats = {i.name: reg.loras.index_stats(i.name) for i in reg.loras.list_indices()}
    assert {"lora_id_idx", "search_text_idx"} <= set(stats)
    assert {i.name for i in reg.files.list_indices()} == {"path_idx", "sha256_idx", "lora_id_idx", "size_bytes_idx"}
    assert all(s.num_unindexed_rows == 0 for s in stats.values())


def test_tagging_a_missing_version_and_a_version_given_as_digits(tmp_path):
    """Tagging a version that does not exist is a ``ValueError`` naming those that do; "12" (a
    command line's) opens version 12 unless a tag has that name, which wins."""
    reg = Registry.open(tmp_path / "registry")
    reg.add(_folder(tmp_path / "a", 1))
    first = reg.version
    reg.add(_folder(tmp_path / "b", 1, offset=1))
    with pytest.raises(ValueError, match=rf"^no version 9999; versions: 1-{reg.version}$"):
        reg.tag("old", 9999)
    assert reg.tags() == {}
    pinned = Registry.open(reg.root, version=str(first))
    assert pinned.version == first and len(pinned) == 1 and len(pinned.search("lora", k=5)) == 1
    with pytest.raises(RegistryNotFound, match=rf"has no version 9999; versions: 1-{reg.version}, tags: none"):
        Registry.open(reg.root, version="9999")
    reg.tag(str(first), reg.version)  # a tag named like a number
    assert len(Registry.open(reg.root, version=str(first))) == 2


def test_an_empty_tag_name_is_a_value_error(tmp_path):
    reg = Registry.open(tmp_path / "registry")
    for name in ("", "  ", " prod"):
        with pytest.raises(ValueError, match="a tag name must be a non-empty name"):
            reg.tag(name)
    assert reg.tags() == {}
