"""The Dagster code location: ``dagster dev -w workspace.yaml``."""

from __future__ import annotations

import dagster as dg

from assets_defs.ingest import ingested_loras
from assets_defs.maintenance import registry_indexes
from assets_defs.generation import fusion_gates, fusion_report, generation_report
from assets_defs.models import lora_weight_encoder, weight_embeddings
from assets_defs.resources import RegistryResource
from assets_defs.retrieval_report import retrieval_report
from assets_defs.jobs import ingest_job, retrieval_job
from assets_defs.captions import CaptionerResource, lora_captions
from assets_defs.sources import source_crawl_schedules, source_sensors, source_sync_job, synced_loras
from assets_defs.automation import (
    encoder_retrain_sensor, maintenance_job, registry_automation, registry_maintenance_schedule, reports_job,
    reports_schedule, retrain_job,
)
from assets_defs.registry_gates import gates_retrain_job, gates_retrain_sensor, registry_gates

defs = dg.Definitions(
    assets=[ingested_loras, registry_indexes, lora_weight_encoder, weight_embeddings, fusion_gates, fusion_report,
            generation_report, retrieval_report, synced_loras, lora_captions, registry_gates],
    jobs=[ingest_job, retrieval_job, source_sync_job, retrain_job, gates_retrain_job, maintenance_job,
          reports_job],
    # one per enabled source in sources.toml (the demo's local folder by default), then the automation
    sensors=[*source_sensors(), encoder_retrain_sensor, gates_retrain_sensor, registry_automation],
    schedules=[registry_maintenance_schedule, reports_schedule, *source_crawl_schedules()],
    resources={"registry": RegistryResource(), "captioner": CaptionerResource()},
)
