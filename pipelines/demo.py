"""The main job on embedded defaults: build the demo world when missing, register its base,
ingest its training LoRAs, train the LoRA-weight encoder on them (cached while that pool is
unchanged), ingest the held-out LoRAs (embedded zero-shot at ingest), and show a few searches on
every channel."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from registry import Registry, SearchHit
from registry.ingest import IngestReport
from registry.lora.base_models import BaseModel
from registry.store.store import quote

DEMO_PROMPTS = ("a red circle on a striped background", "a crimson disc with a neon glow",
                "hatched style star", "blue square, outline style")
CHANNELS = ("weights", "text", "hybrid")


@dataclass
class DemoResult:
    """What the main job did."""

    registry: Registry
    ingest: IngestReport
    encoder: dict | None = None
    searches: dict[str, dict[str, list[SearchHit]]] = field(default_factory=dict)  # prompt -> channel -> hits


def run_demo(workdir: str | Path = ".autolora", size: str = "default", seed: int = 0,
             folders: list[str] | None = None, progress: bool = True) -> DemoResult:
    """Ingest ``folders`` (default: the demo world, built if missing, with its encoder) and search."""
    workdir = Path(workdir)
    registry = Registry.open(workdir / "registry")
    encoder = None
    if folders:
        report = registry.add(folders, progress=progress)  # known files cost a stat on a rerun
    else:
        from pipelines.encoder_pool import train_registry_encoder
        from pipelines.world.build import DEMO_BASE_NAME, build_world

        world = build_world(workdir / "world", size=size, seed=seed, progress=progress)
        registry.register_base(BaseModel.from_json((Path(world["base"]).parent / "base_model.json").read_text()))
        report = registry.add([world["loras"]], progress=progress)
        train_pool = f"source_path LIKE {quote(os.path.realpath(world['loras']) + os.sep + '%')}"
        encoder = train_registry_encoder(registry, DEMO_BASE_NAME, train_pool, progress=progress)
        held = registry.add([world["heldout_loras"]], progress=progress)  # zero-shot: no retraining
        for name in ("added", "duplicates", "refreshed", "unchanged", "rejected", "warnings"):
            getattr(report, name).extend(getattr(held, name))
    registry.maintain()
    channels = CHANNELS if any(r.active for r in registry.encoder_versions()) else ("text",)
    searches = {p: {c: registry.search(p, k=3, channel=c) for c in channels} for p in DEMO_PROMPTS}
    return DemoResult(registry, report, encoder, searches)
