"""World LoRAs map to registry rows by content: a byte-identical copy of the world (or a moved
checkout) matches the registry it was ingested into, a changed file does not."""

from __future__ import annotations

import json
import shutil

import pytest

from pipelines.evaluate.retrieval import manifest_ids


def test_a_copied_world_matches_by_content(micro_world, micro_registry, tmp_path):
    entries = json.loads((micro_world / "world.json").read_text())["loras"]
    copy = tmp_path / "copy"
    for entry in entries:
        (copy / entry["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(micro_world / entry["file"], copy / entry["file"])
    original = manifest_ids(micro_registry, micro_world, entries)
    assert len(original) == len(entries)
    assert manifest_ids(micro_registry, copy, entries) == original
    with (copy / entries[0]["file"]).open("ab") as handle:
        handle.write(b"\0")  # other bytes: not the registered LoRA any more
    with pytest.raises(LookupError, match=f"1 world LoRA.*{entries[0]['file']}"):
        manifest_ids(micro_registry, copy, entries)
