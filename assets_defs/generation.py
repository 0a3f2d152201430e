"""Dagster assets for generation: the fusion gates (trained on the world's training pool) and the
fusion and generation reports.  Business logic lives in ``pipelines``; this only wires it."""

import base64
import io
import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets_defs.resources import RegistryResource

WORLD = os.environ.get("AUTOLORA_WORLD", ".autolora/world/default-seed0")
REPORTS = os.environ.get("AUTOLORA_REPORTS", ".autolora/reports")


class GatesConfig(dg.Config):
    """Which world's training pool, and the recipe knobs worth changing from the launchpad."""

    world: str = Field(WORLD, description="a built demo world: its training pool trains the gates")
    steps: int = Field(300, description="optimiser steps")
    hinge: float = Field(0.0, description="weight of the hinge term of the authors' later code (0: eq. 10 only)")
    composite: float = Field(1.0, description="share of steps on images of the whole active set (rest: eq. 10)")
    time_features: int = Field(0, description="> 0: timestep-conditioned gates with this many sinusoidal "
                                              "features (measured no better on the demo world)")


class ReportConfig(dg.Config):
    """Where the held-out LoRAs come from and how much to evaluate (the generation report)."""

    world: str = Field(WORLD, description="a built demo world (its held-out LoRAs and read-out)")
    out: str = Field(REPORTS, description="folder for the markdown report and its image grids")
    prompts: int = Field(8, description="prompts per held-out theme (generation) or per LoRA set (fusion)")


class FusionReportConfig(ReportConfig):
    """The report's config and how many held-out LoRA sets to fuse."""

    sets: int = Field(8, description="held-out LoRA sets per k")


def world_root(world: str) -> Path:
    """The built demo world ``world`` names (itself or its parent holding one); none there fails the
    run without retries, saying how to get one."""
    from pipelines.world.evaluate import WorldNotFound, resolve_world_root

    try:
        return resolve_world_root(world)
    except WorldNotFound as error:
        raise dg.Failure(description=f"{error}, or set AUTOLORA_WORLD (or this asset's world config) to a built one",
                         allow_retries=False) from None


def _png_data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def loss_curve_md(losses: list[float], window: int = 25) -> str:
    """The gate loss curve as an embedded PNG (no ``MetadataValue.image`` in Dagster 1.13)."""
    import numpy as np
    from PIL import Image, ImageDraw

    if not losses:
        return "no losses recorded (loaded from cache without a curve)"
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid") if len(losses) > window else np.array(losses)
    w, h = 400, 160
    img = Image.new("RGB", (w, h), "white")
    lo, hi = float(smooth.min()), float(smooth.max()) or 1.0
    pts = [(int(i * (w - 1) / max(1, len(smooth) - 1)), int((h - 10) - (v - lo) / max(hi - lo, 1e-9) * (h - 20)))
           for i, v in enumerate(smooth)]
    ImageDraw.Draw(img).line(pts, fill="navy", width=2)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return f"moving average ({window} steps), {lo:.3f} .. {hi:.3f}\n\n![gate loss]({url})"


def report_markdown(path: Path) -> str:
    """A report's markdown with its PNG grids inlined as data URLs."""
    text = path.read_text()
    for png in path.parent.glob("*.png"):
        text = text.replace(f"]({png.name})", f"]({_png_data_url(png)})")
    return text


@dg.asset(group_name="models", kinds={"pytorch"})
def fusion_gates(context: dg.AssetExecutionContext, config: GatesConfig) -> dg.MaterializeResult:
    """Gates trained with interference-resistant training on the world's training pool (cached by version)."""
    from pipelines.train_gates import GateRecipe, train_world_gates

    recipe = GateRecipe(steps=config.steps, hinge=config.hinge, composite=config.composite,
                        time_features=config.time_features)
    result = train_world_gates(world_root(config.world), recipe=recipe)
    context.log.info(f"gates {result.version} ({'cached' if result.cached else 'trained'}) at {result.path}")
    return dg.MaterializeResult(metadata={
        "version": result.version, "path": str(result.path), "cached": result.cached,
        "pool_size": len(result.gates.meta.get("pool", [])), "seconds": float(result.gates.meta.get("seconds", 0.0)),
        "final_loss": float(sum(result.losses[-50:]) / max(1, len(result.losses[-50:]))) if result.losses else 0.0,
        "loss_curve": dg.MetadataValue.md(loss_curve_md(result.losses)),
    })


@dg.asset(group_name="reports", deps=[fusion_gates])
def fusion_report(context: dg.AssetExecutionContext, config: FusionReportConfig) -> dg.MaterializeResult:
    """Every fusion method on held-out LoRA pairs and triples, with base and single rows."""
    from pipelines.evaluate.fusion import evaluate_fusion
    from pipelines.train_gates import AUTHORS_RECIPE, train_world_gates

    world = world_root(config.world)
    gates = train_world_gates(world).gates
    paper = train_world_gates(world, recipe=AUTHORS_RECIPE).gates  # the anchor row's (cached after the first run)
    report = evaluate_fusion(world, config.out, gates=gates, gates_paper=paper, n_sets=config.sets,
                             n_prompts=config.prompts, progress=False)
    return dg.MaterializeResult(metadata={
        **{f"{method}_{key}": row[key] for method, row in report.items() for key in ("k2_accuracy", "k3_accuracy")},
        "gated_loss_ratio": report["gated"]["loss_ratio"],
        "report_path": dg.MetadataValue.path(str(Path(config.out).absolute() / "fusion.md")),
        "report": dg.MetadataValue.md(report_markdown(Path(config.out) / "fusion.md")),
        "json": dg.MetadataValue.json(report)})


@dg.asset(group_name="reports", deps=[fusion_gates, "ingested_loras", "weight_embeddings"])
def generation_report(context: dg.AssetExecutionContext, config: ReportConfig,
                      registry: RegistryResource) -> dg.MaterializeResult:
    """Word-only prompts on held-out themes: base vs top-1/2/3 retrieved LoRAs fused by gated."""
    from pipelines.evaluate.generation import evaluate_generation
    from pipelines.train_gates import AUTHORS_RECIPE, train_world_gates

    world = world_root(config.world)
    gates = train_world_gates(world).gates
    paper = train_world_gates(world, recipe=AUTHORS_RECIPE).gates  # the anchor rows' (cached after the first run)
    report = evaluate_generation(registry.open(), world, config.out, gates=gates, gates_paper=paper,
                                 n_prompts=config.prompts, progress=False)
    return dg.MaterializeResult(metadata={
        **{f"{group}_{setting}": report[group][setting] for group in ("synonym", "canonical")
           for setting in ("base", "top1", "top2", "top3", "paper_top1", "paper_top2", "paper_top3")
           if report[group].get(setting) is not None},  # paper_*: the anchor (none without an encoder)
        "report_path": dg.MetadataValue.path(str(Path(config.out).absolute() / "generation.md")),
        "report": dg.MetadataValue.md(report_markdown(Path(config.out) / "generation.md")),
        "json": dg.MetadataValue.json(report)})
