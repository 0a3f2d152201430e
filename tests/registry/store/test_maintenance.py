"""Index creation after an ingest looks only at the tables the ingest grew."""

from __future__ import annotations

from pathlib import Path

from flux_fixtures import flux_lora, partial_names

import registry.ingest as ingest
from registry import Registry
from registry.lora.formats import save_lora
from registry.store import maintenance


def _folder(root: Path, n: int, offset: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(offset, offset + n):
        save_lora(root / f"lora_{i:03d}.safetensors",
                  flux_lora(partial_names((i % 19,), (), attention_only=True), rank=2, seed=700 + i), "diffusers")
    return root


def test_an_ingest_indexes_the_tables_it_grew_and_looks_at_none_when_nothing_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(maintenance, "SCALAR_INDEX_MIN_ROWS", 3)
    looked_at = []

    def recorded(store, *, tables=None, **kwargs):
        looked_at.append(set(tables) if tables is not None else None)
        return maintenance.ensure_indexes(store, tables=tables, **kwargs)

    monkeypatch.setattr(ingest, "ensure_indexes", recorded)
    folder = _folder(tmp_path / "loras", 4)
    reg = Registry.open(tmp_path / "registry")
    assert len(reg.add([folder]).added) == 4
    assert looked_at == [{"loras", "files"}]
    assert {"path", "sha256", "lora_id", "size_bytes"} <= {c for i in reg.files.list_indices() for c in i.columns}
    assert {"lora_id", "encoder_version"} <= {c for i in reg.loras.list_indices() for c in i.columns}
    assert reg.rejections.list_indices() == []  # not grown: nothing looked at there

    assert len(reg.add([folder]).unchanged) == 4  # a stat each: no table written, none looked at
    assert looked_at[-1] == set()
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    report = reg.add([folder])
    assert len(report.rejected) == 1 and looked_at[-1] == {"rejections"}
