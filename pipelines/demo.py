"""The main job on embedded defaults: build the demo world when missing, register its base,
ingest its training LoRAs, caption their sample renders with the world's tiny Qwen2-VL served by
vLLM, train the LoRA-weight encoder on them (cached while that pool is unchanged), ingest and
caption the held-out LoRAs (embedded zero-shot at ingest), show a few searches on every channel, train the fusion gates (cached while the pool is unchanged) and render one prompt
with its top-3 LoRAs fused by every fusion method into one PNG grid."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from registry import Registry, SearchHit
from registry.ingest import IngestReport
from registry.lora.base_models import BaseModel
from registry.store.store import quote

DEMO_PROMPTS = ("a red circle on a striped background", "a crimson disc with a neon glow",
                "hatched style star", "blue square, outline style")
CHANNELS = ("weights", "text", "hybrid")
FUSION_PROMPT = "a crimson disc with a neon glow"
FUSION_IMAGES = 4  # seeds per method in the grid


@dataclass
class DemoResult:
    """What the main job did."""

    registry: Registry
    ingest: IngestReport
    encoder: dict | None = None
    searches: dict[str, dict[str, list[SearchHit]]] = field(default_factory=dict)  # prompt -> channel -> hits
    gates: dict | None = None
    fusion_grid: Path | None = None
    captions: list[dict] = field(default_factory=list)  # one CaptionReport per captioning pass


def run_demo(workdir: str | Path = ".autolora", size: str = "default", seed: int = 0,
             folders: list[str] | None = None, progress: bool = True) -> DemoResult:
    """Ingest ``folders`` (default: the demo world, built if missing, with its encoder) and search."""
    workdir = Path(workdir)
    registry = Registry.open(workdir / "registry")
    encoder, captions = None, []
    if folders:
        report = registry.add(folders, progress=progress)  # known files cost a stat on a rerun
    else:
        from pipelines.encoder_pool import Recipe, train_registry_encoder
        from pipelines.world.build import DEMO_BASE_NAME, build_world, train_captioner

        world = build_world(workdir / "world", size=size, seed=seed, progress=progress)
        root = Path(world["base"]).parent
        registry.register_base(BaseModel.from_json((root / "base_model.json").read_text()))
        report = registry.add([world["loras"]], progress=progress)
        with _captioning(registry, train_captioner(root, size, seed), root, workdir) as caption:
            captions.append(caption())  # the training LoRAs' renders: texts for the encoder
            train_pool = f"source_path LIKE {quote(os.path.realpath(world['loras']) + os.sep + '%')}"
            recipe = Recipe(probes_from=str(root / "base"))  # probes from the base's real layer inputs
            encoder = train_registry_encoder(registry, DEMO_BASE_NAME, train_pool, recipe, progress=progress)
            held = registry.add([world["heldout_loras"]], progress=progress)  # zero-shot: no retraining
            captions.append(caption())
        for name in ("added", "duplicates", "refreshed", "unchanged", "rejected", "warnings"):
            getattr(report, name).extend(getattr(held, name))
    registry.maintain()
    channels = CHANNELS if any(r.active for r in registry.encoder_versions()) else ("text",)
    searches = {p: {c: registry.search(p, k=3, channel=c) for c in channels} for p in DEMO_PROMPTS}
    result = DemoResult(registry, report, encoder, searches, captions=captions)
    if not folders:
        result.gates, result.fusion_grid = fusion_grid(registry, Path(world["base"]).parent, workdir / "reports")
    return result


@contextmanager
def _captioning(registry: Registry, model_dir: Path, world_root: Path, workdir: Path):
    """Yields a function that captions every LoRA lacking captions of the world's captioner
    (renders made by the base for LoRAs without any), through a vLLM server started on first
    need (a rerun with nothing to caption starts none) and stopped when the block ends."""
    from contextlib import ExitStack

    from pipelines.caption import Captioner
    from pipelines.caption_registry import caption_registry, idle_report, pending_captions
    from pipelines.captioner_endpoint import CaptionerEndpoint
    from pipelines.world.build import DEMO_BASE_NAME

    served = f"world-captioner-{world_root.name}"  # the cache key: captions of this world's model
    endpoint = CaptionerEndpoint(model_dir=str(model_dir), served_name=served, cache_dir=str(workdir / "caption-cache"))
    bases = {DEMO_BASE_NAME: world_root / "base"}
    with ExitStack() as stack:
        captioner: list[Captioner] = []

        def caption() -> dict:
            if not pending_captions(registry, served, bases):
                return idle_report(registry, served).to_dict()
            if not captioner:
                captioner.append(stack.enter_context(endpoint.connect())[0])
            return caption_registry(registry, captioner[0], base_pipelines=bases).to_dict()

        yield caption


def fusion_grid(registry: Registry, world_root: Path, out: Path) -> tuple[dict, Path]:
    """Gates for the world's training pool (cached), then :data:`FUSION_PROMPT` with its top-3
    LoRAs under every fusion method: one row of :data:`FUSION_IMAGES` images per method."""
    from pipelines.evaluate.fusion_common import save_grid
    from pipelines.fusion_methods import METHODS
    from pipelines.generate import Generator, with_triggers
    from pipelines.train_gates import train_world_gates

    training = train_world_gates(world_root)
    hits = registry.search(FUSION_PROMPT, k=3)
    prompt = with_triggers(FUSION_PROMPT, [w for h in hits for w in h.trigger_words])
    with Generator(registry, world_root / "base", training.gates) as generator:
        rows = {m: generator.render([prompt] * FUSION_IMAGES, [h.lora_id for h in hits], seed=0, method=m)
                for m in METHODS}
    grid = save_grid(out / "demo-fusion.png", rows, title=prompt)
    gates = {"version": training.version, "cached": training.cached, "seconds": round(training.seconds, 1),
             "prompt": prompt, "loras": [h.name for h in hits], "methods": list(rows)}
    return gates, grid
