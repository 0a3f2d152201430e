"""The main job on embedded defaults: build the demo world when missing, register its base,
ingest its LoRA folders into the registry, and show a few searches."""

from __future__ import annotations

from pathlib import Path

from registry.lora.base_models import BaseModel
from registry.ingest import IngestReport
from registry import Registry, SearchHit

DEMO_PROMPTS = ("a red circle on a striped background", "a crimson disc with a neon glow",
                "hatched style star", "blue square, outline style")


def run_demo(workdir: str | Path = ".autolora", size: str = "default", seed: int = 0,
             folders: list[str] | None = None, progress: bool = True) -> tuple[Registry, IngestReport,
                                                                             dict[str, list[SearchHit]]]:
    """Ingest ``folders`` (default: the demo world's LoRA folders, built if missing) and search."""
    workdir = Path(workdir)
    registry = Registry.open(workdir / "registry")
    if not folders:
        from pipelines.world.build import build_world

        world = build_world(workdir / "world", size=size, seed=seed, progress=progress)
        registry.register_base(BaseModel.from_json((Path(world["base"]).parent / "base_model.json").read_text()))
        folders = [world["loras"], world["heldout_loras"]]
    report = registry.add(folders, progress=progress)  # known files cost a stat on a rerun
    registry.maintain()
    return registry, report, {p: registry.search(p, k=3) for p in DEMO_PROMPTS}
