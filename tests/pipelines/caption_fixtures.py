"""A small registry for the captioning tests: two micro-world LoRAs with their cards and sample
renders, and one held-out LoRA copied bare (no card, no render: self-rendering's case)."""

from __future__ import annotations

import shutil
from pathlib import Path

from registry import Registry
from registry.lora.base_models import BaseModel

WITH_RENDERS = ("triangle", "square")  # 1 and 2 sample renders
WITHOUT = "red-diamond"  # copied without its card and preview


def captioning_registry(micro_world: Path, root: Path) -> Registry:
    """The registry at ``root/registry``, its LoRAs first copied to ``root/loras``."""
    folder = root / "loras"
    folder.mkdir()
    for theme in WITH_RENDERS:
        for file in (micro_world / "loras").glob(f"{theme}.*"):
            shutil.copy(file, folder / file.name)
    shutil.copy(micro_world / "heldout_loras" / f"{WITHOUT}.safetensors", folder)
    reg = Registry.open(root / "registry")
    reg.register_base(BaseModel.from_json((micro_world / "base_model.json").read_text()))
    assert len(reg.add([folder]).added) == 3
    return reg
