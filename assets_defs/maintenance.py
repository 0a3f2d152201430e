"""Index maintenance as an asset: the one place (besides the CLI) that refreshes indexes."""

import dagster as dg

from assets_defs.ingest import ingested_loras
from assets_defs.resources import RegistryResource
from assets_defs.sources import synced_loras

# eager, but also for a registry that only ever ingests through one of the two paths (eager alone
# waits for every dependency to have been materialised once)
AFTER_ARRIVALS = dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing())


@dg.asset(group_name="registry", kinds={"lancedb"}, deps=[ingested_loras, synced_loras],
          automation_condition=AFTER_ARRIVALS)
def registry_indexes(context: dg.AssetExecutionContext, registry: RegistryResource) -> dg.MaterializeResult:
    """The registry's indexes refreshed and its tables compacted after new arrivals (safe beside
    a concurrent ingest: a step that loses a race yields and is retried next time)."""
    report = registry.open().maintain(collect_blobs=True)
    for step in report.yielded:
        context.log.warning(f"yielded to a concurrent writer: {step}")
    return dg.MaterializeResult(metadata={
        "created": ", ".join(report.created) or "none", "optimized": ", ".join(report.optimized),
        "yielded": len(report.yielded), "stale_staging_removed": report.stale_staging_removed,
        "orphan_blobs_removed": report.orphan_blobs_removed, "orphan_bytes_freed": report.orphan_bytes_freed,
        "seconds": report.seconds,
    })
