"""Ingest asset: local LoRA files and folders → the registry."""

import os

import dagster as dg
from pydantic import Field

from assets_defs.resources import RegistryResource
from pipelines.sources.local import DEMO_LORAS

class IngestConfig(dg.Config):
    """Which files or folders to ingest (folders are walked; default: the demo world's LoRAs)."""

    paths: list[str] = Field([os.environ.get("AUTOLORA_WATCH_DIR", DEMO_LORAS)],
                             description="files and folders to ingest (default: $AUTOLORA_WATCH_DIR or the demo "
                                         "world's LoRAs)")

def _markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")).replace("|", "\\|") for c in columns) + " |" for row in rows]
    return "\n".join(lines)

@dg.asset(group_name="registry", kinds={"lancedb"}, pool="registry_writes")
def ingested_loras(context: dg.AssetExecutionContext, config: IngestConfig,
                   registry: RegistryResource) -> dg.MaterializeResult:
    """LoRA files validated, canonicalised, deduplicated and upserted into the registry."""
    reg = registry.open(create=True)
    paths = [p for p in config.paths if os.path.lexists(os.path.expandvars(os.path.expanduser(p)))]
    missing = sorted(set(config.paths) - set(paths))
    if missing and not paths:
        raise dg.Failure(f"none of the paths exist: {missing} (set paths in the run config, or AUTOLORA_WATCH_DIR)")
    if missing:
        context.log.warning(f"skipping paths that do not exist: {missing}")
    report = reg.add(paths)
    context.log.info(f"{len(report.added)} added, {len(report.duplicates)} duplicates, "
                     f"{len(report.rejected)} rejected")
    return dg.MaterializeResult(metadata={
        "added": len(report.added),
        "duplicates": len(report.duplicates),
        "refreshed": len(report.refreshed),
        "unchanged": len(report.unchanged),
        "rejected": len(report.rejected),
        "registry_rows": len(reg),
        "registry_version": reg.version,
        "rejections": dg.MetadataValue.md(_markdown(report.rejected, ["path", "reason"]) if report.rejected
                                          else "none"),
        "added_loras": dg.MetadataValue.md(_markdown(report.added, ["lora_id", "path"]) if report.added
                                           else "none"),
    })

