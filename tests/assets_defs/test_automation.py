"""The automation a user turns on in the Dagster UI: the encoder is retrained when its pool grows
(sensor → retrain_job run → new active version), and the indexes and weight vectors are
refreshed after arrivals (declarative automation)."""

from __future__ import annotations

import os
import shutil

import dagster as dg
from sensor_ticks import skipped, tick

from assets_defs.automation import encoder_retrain_sensor, encoder_run_config, retrain_job, retrain_sensor
from assets_defs.definitions import defs
from assets_defs.models import EncoderTrainingConfig, lora_weight_encoder
from assets_defs.resources import RegistryResource
from pipelines.retrain_policy import PoolGrowth
from registry import BaseModel, Registry
from registry.store.store import quote


def test_the_encoder_is_retrained_when_its_pool_grows(micro_world, tmp_path):
    registry = str(tmp_path / "registry")
    instance = dg.DagsterInstance.ephemeral()
    assert "holds no autolora registry" in skipped(tick(encoder_retrain_sensor, registry, instance))

    pool_dir = tmp_path / "loras"  # the folder the user trains on; new LoRAs arrive in it
    pool_dir.mkdir()
    for lora in sorted((micro_world / "loras").glob("*.safetensors")):
        shutil.copy(lora, pool_dir)
    reg = Registry.open(registry)
    base_model = BaseModel.from_json((micro_world / "base_model.json").read_text())
    reg.register_base(base_model)
    reg.add(pool_dir)
    base = base_model.name
    sensor = retrain_sensor(min_growth=0.2, min_new=2, first_pool=4)

    # no encoder yet: a first one is requested for the whole base, with the default recipe
    first = tick(sensor, registry, instance).run_requests
    assert len(first) == 1 and first[0].tags["autolora/base_model"] == base
    assert first[0].run_config["ops"]["lora_weight_encoder"]["config"] == {"base_model": base, "where": ""}

    # the user trains on the folder with a short recipe; the sensor keeps both
    pool = f"source_path LIKE {quote(os.path.realpath(pool_dir) + os.sep + '%')}"
    config = {"base_model": base, "where": pool, "steps": 20}
    job = retrain_job.resolve(asset_graph=defs.resolve_asset_graph())
    run = job.execute_in_process(run_config={"ops": {"lora_weight_encoder": {"config": config}}}, instance=instance,
                                 resources={"registry": RegistryResource(path=registry)})
    assert run.success
    (first_active,) = [r for r in Registry.open(registry).encoder_versions() if r.active]
    trained = {first_active.version}
    assert f"0 new LoRA(s) since encoder {next(iter(trained))}" in skipped(tick(sensor, registry, instance))

    # held-out LoRAs elsewhere are not the pool; new files in the pool's folder are
    *arrivals, elsewhere = sorted((micro_world / "heldout_loras").glob("*.safetensors"))[:3]
    assert len(Registry.open(registry).add(elsewhere).added) == 1
    assert "0 new LoRA(s)" in skipped(tick(sensor, registry, instance))
    for lora in arrivals:
        shutil.copy(lora, pool_dir / f"arrived-{lora.name}")
    assert len(Registry.open(registry).add(pool_dir).added) == 2
    (request,) = tick(sensor, registry, instance).run_requests
    assert request.run_config["ops"]["lora_weight_encoder"]["config"] == {
        "base_model": base, "where": pool, "design": "ours", "steps": 20, "batch_size": 32, "lr": None, "seed": 0,
        "probes_from": "", "text_encoder": ""}
    assert "2 new LoRA(s)" in request.tags["autolora/reason"]

    run = job.execute_in_process(run_config=request.run_config, instance=instance,
                                 resources={"registry": RegistryResource(path=registry)})
    assert run.success
    reg = Registry.open(registry, create=False)
    (active,) = [r for r in reg.encoder_versions() if r.active]
    assert active.version not in trained and request.run_key.endswith(active.version)
    assert active.info["pool_size"] == first_active.info["pool_size"] + 2
    versions = {r["encoder_version"] for r in reg.column_rows(reg.loras, ["encoder_version"])}
    assert versions == {active.version}  # every row re-embedded by the new version, held-out ones too
    assert "0 new LoRA(s)" in skipped(tick(sensor, registry, instance))


def test_arrivals_refresh_the_indexes_and_weight_vectors():
    instance = dg.DagsterInstance.ephemeral()
    targets = {dg.AssetKey("registry_indexes"), dg.AssetKey("weight_embeddings")}
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    cursor = result.cursor
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
    assert result.total_requested == 0  # nothing arrived

    for arrival in ("ingested_loras", "synced_loras"):  # either path alone triggers both
        instance.report_runless_asset_event(dg.AssetMaterialization(arrival))
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert {key for key in targets if result.get_num_requested(key)} == targets
        for key in targets:  # as if the requested runs happened
            instance.report_runless_asset_event(dg.AssetMaterialization(key))
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert result.total_requested == 0


def test_schedules_and_sensors_are_defined_stopped():
    repo = defs.get_repository_def()
    assert {s.name: s.job_name for s in repo.schedule_defs} == {"registry_maintenance_schedule": "maintenance_job",
                                                                "reports_schedule": "reports_job"}
    assert all(s.default_status == dg.DefaultScheduleStatus.STOPPED for s in repo.schedule_defs)
    assert {"encoder_retrain_sensor", "registry_automation"} <= {s.name for s in repo.sensor_defs}
    assert all(s.default_status == dg.DefaultSensorStatus.STOPPED for s in repo.sensor_defs)


# a value other than the default for every Recipe field (pipelines.encoder_pool.Recipe)
NON_DEFAULT = {"design": "paper", "steps": 7, "batch_size": 8, "lr": 5e-3, "seed": 3,
               "probes_from": "/abs/world/base", "text_encoder": "clip"}


def _recipe_fields() -> set[str]:
    """The Recipe fields; the ``lora_weight_encoder`` asset's config takes every one."""
    from pipelines.encoder_pool import Recipe

    fields = set(Recipe.__dataclass_fields__)
    assert fields == set(NON_DEFAULT)  # a new Recipe field: give it a non-default value above
    assert fields <= set(EncoderTrainingConfig.model_fields)
    return fields


def _growth(recipe: dict, base: str = "b", ids: tuple[str, ...] = ("l1", "l2")) -> PoolGrowth:
    from pipelines.encoder_pool import Recipe, version_of

    return PoolGrowth(base_model=base, pool_size=len(ids), new=len(ids), trained_on=0, active_version="enc-0",
                      where="tags LIKE '%x%'", recipe=recipe,
                      next_version=version_of(list(ids), base, Recipe(**recipe)))


def test_the_retrain_run_trains_the_version_its_run_key_names(tmp_path, monkeypatch):
    """Every recipe field is carried (lr and batch_size included), so the asset trains the very
    recipe (and version) the sensor's run key names."""
    import pipelines.encoder_pool as encoder_pool
    from pipelines.encoder_pool import Recipe, version_of

    recipe = {k: NON_DEFAULT[k] for k in _recipe_fields()}
    growth = _growth(recipe)
    run_config = encoder_run_config(growth)
    config = run_config["ops"]["lora_weight_encoder"]["config"]
    assert config == {"base_model": "b", "where": growth.where, **recipe}

    trained = []

    def train(reg, base_model, where, recipe):  # what the asset would train, not training it
        trained.append((base_model, where, recipe))
        return {"version": "v", "pool_size": 2, "trained": False, "embedding": {}}

    monkeypatch.setattr(encoder_pool, "train_registry_encoder", train)
    Registry.open(tmp_path / "registry")  # an empty one: the asset never creates a registry
    result = dg.materialize([lora_weight_encoder], run_config=run_config,
                            resources={"registry": RegistryResource(path=str(tmp_path / "registry"))})
    assert result.success
    ((base_model, where, made),) = trained
    assert (base_model, where, made) == ("b", growth.where, Recipe(**recipe))
    assert version_of(["l1", "l2"], base_model, made) == growth.next_version


def test_the_schedules_state_their_timezone():
    repo = defs.get_repository_def()
    for schedule in repo.schedule_defs:
        assert schedule.execution_timezone == "UTC" and "UTC" in (schedule.description or ""), schedule.name
