"""What runs by itself once turned on in the UI (Automation tab; all start stopped, as Dagster's do):

* ``encoder_retrain_sensor``: retrains a base model's LoRA-weight encoder when its pool has grown
  enough (``pipelines.retrain_policy``), with the active encoder's recipe; registering the new
  version re-embeds every LoRA and switches search to it in one step.
* ``registry_automation``: Dagster's declarative automation for the registry's derived assets:
  ``registry_indexes`` and ``weight_embeddings`` are refreshed after every ingest or source sync
  (re-indexing incrementally on arrivals: only rows lacking a vector are embedded).
* ``registry_maintenance_schedule``: the indexes and compaction once a night (03:00 UTC), the one
  place that runs them besides the CLI.
* ``reports_schedule``: the retrieval, fusion and generation reports once a week (Sundays 04:00 UTC;
  they evaluate on a built demo world's held-out LoRAs, ``$AUTOLORA_WORLD``).
"""

import dagster as dg

from assets_defs.generation import fusion_gates, fusion_report, generation_report
from assets_defs.maintenance import registry_indexes
from assets_defs.models import lora_weight_encoder, weight_embeddings
from assets_defs.resources import RegistryResource
from assets_defs.retrieval_report import retrieval_report
from pipelines.retrain_policy import FIRST_POOL, MIN_GROWTH, MIN_NEW, growth_by_base

retrain_job = dg.define_asset_job("retrain_job", selection=[lora_weight_encoder],
                                  description="retrain the LoRA-weight encoder of one base on its grown pool")
maintenance_job = dg.define_asset_job("maintenance_job", selection=[registry_indexes])
reports_job = dg.define_asset_job("reports_job", selection=[fusion_gates, fusion_report, generation_report,
                                                            retrieval_report])


def encoder_run_config(growth) -> dict:
    """The ``lora_weight_encoder`` run config that retrains ``growth``'s pool with the same recipe
    (the asset's config takes every recipe field, so the run makes ``growth.next_version``)."""
    config = {"base_model": growth.base_model, "where": growth.where, **growth.recipe}
    return {"ops": {"lora_weight_encoder": {"config": config}}}


def retrain_sensor(min_growth: float = MIN_GROWTH, min_new: int = MIN_NEW, first_pool: int = FIRST_POOL,
                   name: str = "encoder_retrain_sensor") -> dg.SensorDefinition:
    """The sensor requesting a ``retrain_job`` run per base model whose pool grew enough (see
    ``pipelines.retrain_policy``); its run key is the version the run will make, so one pool is
    never requested twice."""

    @dg.sensor(name=name, job=retrain_job, minimum_interval_seconds=600,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description=f"retrain a base's LoRA-weight encoder once its pool grew by {min_growth:.0%} "
                           f"(at least {min_new} new LoRAs; a first one at {first_pool} LoRAs)")
    def _sensor(context: dg.SensorEvaluationContext, registry: RegistryResource) -> dg.SensorResult | dg.SkipReason:
        from registry.store.store import RegistryNotFound

        try:
            reg = registry.open_existing()
        except RegistryNotFound as error:
            return dg.SkipReason(str(error))
        growths = growth_by_base(reg)
        if not growths:
            return dg.SkipReason(f"no LoRAs of a known base model in {reg.root}")
        due = [g for g in growths if g.due(min_growth, min_new, first_pool)]
        if not due:
            return dg.SkipReason("; ".join(g.reason(min_growth, min_new, first_pool) for g in growths))
        return dg.SensorResult(run_requests=[
            dg.RunRequest(run_key=f"{g.base_model}:{g.next_version}", run_config=encoder_run_config(g),
                          tags={"autolora/base_model": g.base_model,
                                "autolora/reason": g.reason(min_growth, min_new, first_pool)})
            for g in due])

    return _sensor


encoder_retrain_sensor = retrain_sensor()

registry_automation = dg.AutomationConditionSensorDefinition(
    "registry_automation", target=dg.AssetSelection.assets(registry_indexes, weight_embeddings),
    default_status=dg.DefaultSensorStatus.STOPPED, minimum_interval_seconds=60,
    description="refresh the indexes and the weight vectors after new arrivals")

registry_maintenance_schedule = dg.ScheduleDefinition(
    name="registry_maintenance_schedule", job=maintenance_job, cron_schedule="0 3 * * *",
    execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.STOPPED,
    description="index maintenance and compaction, nightly at 03:00 UTC")

reports_schedule = dg.ScheduleDefinition(
    name="reports_schedule", job=reports_job, cron_schedule="0 4 * * 0",
    execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.STOPPED,
    description="the evaluation reports on the demo world's held-out LoRAs, weekly on Sundays at 04:00 UTC")
