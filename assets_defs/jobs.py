"""Jobs: ingest new files, then refresh the registry's indexes."""

import dagster as dg

from assets_defs.ingest import ingested_loras
from assets_defs.maintenance import registry_indexes

ingest_job = dg.define_asset_job("ingest_job", selection=[ingested_loras, registry_indexes])

retrieval_job = dg.define_asset_job("retrieval_job", selection=["lora_weight_encoder", "weight_embeddings"])
