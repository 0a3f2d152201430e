"""Dagster asset for the retrieval evaluation report (held-out LoRAs; every channel, the stripped
copy, the authors' design, the baselines and the canonical-word reference). Business logic lives
in ``pipelines.evaluate.retrieval``; this only wires it."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from assets_defs.generation import REPORTS, WORLD, report_markdown, world_root
from assets_defs.models import weight_embeddings
from assets_defs.resources import RegistryResource


class RetrievalReportConfig(dg.Config):
    """Which world's held-out LoRAs, where the report goes, and whether to run the baselines."""

    world: str = Field(WORLD, description="a built demo world whose LoRAs are in the registry")
    out: str = Field(str(Path(REPORTS) / "retrieval"), description="folder for the report, figures and JSON")
    baselines: bool = Field(True, description="also the authors' design, weight statistics and render-and-read rows")


@dg.asset(group_name="reports", deps=[weight_embeddings], pool="registry_writes")
def retrieval_report(context: dg.AssetExecutionContext, config: RetrievalReportConfig,
                     registry: RegistryResource) -> dg.MaterializeResult:
    """Search over the world's held-out LoRAs with the active encoder (``autolora eval retrieval``)."""
    from pipelines.evaluate.retrieval import evaluate_retrieval

    world = world_root(config.world)  # before the registry: a missing world is the first thing to say
    report = evaluate_retrieval(registry.open().root, world, config.out, baselines_too=config.baselines)
    context.log.info(f"weights R@3 {report['weights']['recall_at_3']:.3f}, hybrid {report['hybrid']['recall_at_3']:.3f}")
    rows = ["weights", "text", "hybrid", "paper_design", "weight_stats", "render_read", "random", "canonical_oracle"]
    recall = {f"{row}_recall_at_3": report[row]["recall_at_3"] for row in rows if row in report}
    recall.update({f"stripped_{c}_recall_at_3": m["recall_at_3"] for c, m in report["stripped"].items()})
    return dg.MaterializeResult(metadata={
        "encoder": report["encoder"], **recall,
        "within_theme_cos": report["within_theme_cos"], "cross_theme_cos": report["cross_theme_cos"],
        "report_path": dg.MetadataValue.path(str(Path(config.out).absolute() / "retrieval.md")),
        "report": dg.MetadataValue.md(report_markdown(Path(config.out) / "retrieval.md")),
        "json": dg.MetadataValue.json(report)})
