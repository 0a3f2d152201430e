"""The registry's fusion gates in Dagster: the ``registry_gates`` asset (trained, cached, clear
failures) and the ``gates_retrain_sensor`` that retrains them when the pool of LoRAs with sample
renders grows (policy thresholds: tests/pipelines/test_retrain_policy.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg
import pytest
from asset_runs import materialize, micro_registry
from sensor_ticks import skipped, tick

from assets_defs import registry_gates as module
from assets_defs.definitions import defs
from assets_defs.registry_gates import (
    NO_BASE, RECIPE_FIELDS, RegistryGatesConfig, default_gates_base, gates_retrain_job, gates_retrain_sensor,
    gates_sensor, registry_gates,
)
from assets_defs.resources import RegistryResource
from pipelines.generate import resolve_base
from pipelines.registry_gates import newest_gates, render_pairs
from pipelines.retrain_policy import gate_pool_hash
from pipelines.train_gates import load_gates
from registry import BaseModel, Registry
from registry.store.store import quote


def _newest_gates(reg, base: str) -> Path:
    """The checkpoint `autolora generate --base BASE --registry R` picks."""
    return newest_gates(reg, resolve_base(base))[0]


def _materialize(registry: Path, **config) -> dict:
    return materialize(registry_gates, registry, **config)


def test_registry_gates_train_then_cache_and_fail_clearly(micro_world, tmp_path):
    bare = tmp_path / "bare"  # a LoRA without its card and renders: skipped, and said so
    bare.mkdir()
    shutil.copy(micro_world / "heldout_loras" / "bg-plain.safetensors", bare)
    registry = tmp_path / "registry"
    reg = micro_registry(micro_world, registry, micro_world / "loras", bare)
    bare_id = next(r["lora_id"] for r in reg.column_rows(reg.loras, ["lora_id", "source_path"])
                   if r["source_path"].startswith(os.path.realpath(bare)))

    first = _materialize(registry, base=str(micro_world), steps=3)
    assert not first["cached"] and Path(first["path"]).parent == reg.root / "gates"
    assert first["base"] == str((micro_world / "base").resolve()) and first["size"] == 32
    assert first["pool_size"] == len(first["pool"]) == len(reg) - first["skipped"] >= 2
    assert bare_id in first["skipped_loras"] and first["skipped_loras"][bare_id].startswith("no sample render")
    assert first["loss_first"] > 0 and first["loss_last"] > 0 and "gate loss" in first["loss_curve"]
    gates = load_gates(first["path"])
    assert gates.version == first["version"] and gates.meta["pool"] == first["pool"]
    assert gates.meta["recipe"]["steps"] == 3 and _newest_gates(reg, str(micro_world)) == Path(first["path"])

    again = _materialize(registry, base=str(micro_world / "base"), steps=3)  # the same base spelt another way
    assert again["cached"] and again["version"] == first["version"] and again["loss_last"] == first["loss_last"]

    # bad input is a Failure saying what to do, before any model is loaded
    only_one = f"lora_id = {quote(first['pool'][0])}"
    for config, says in (({"base": ""}, NO_BASE.format(" (or the run config's base)")),
                         ({"base": str(tmp_path / "nowhere")}, "no such base pipeline"),
                         ({"base": str(micro_world), "base_model": "sdxl"}, "unknown base model 'sdxl'"),
                         ({"base": str(micro_world), "where": "lora_id = 'x'"}, "matched no LoRAs"),
                         ({"base": str(micro_world), "where": only_one}, "at least two LoRAs")):
        with pytest.raises(dg.Failure) as failure:
            _materialize(registry, **config)
        assert says in failure.value.description, (config, failure.value.description)
    assert failure.value.metadata["skipped"].value == 0  # PoolTooSmall: its skipped LoRAs in the metadata
    with pytest.raises(dg.Failure, match="holds no autolora registry"):
        _materialize(tmp_path / "no-registry", base=str(micro_world), steps=3)
    assert not (tmp_path / "no-registry").exists()  # never created by the asset


def test_the_gates_are_retrained_when_the_pool_with_renders_grows(micro_world, tmp_path, monkeypatch):
    registry = tmp_path / "registry"
    instance = dg.DagsterInstance.ephemeral()
    monkeypatch.setenv("AUTOLORA_GATES_BASE", str(micro_world))  # the default base, read at each tick
    sensor = gates_sensor(min_new=2)
    assert "holds no autolora registry" in skipped(tick(sensor, registry, instance))

    reg = micro_registry(micro_world, registry, micro_world / "loras")
    base_model = BaseModel.from_json((micro_world / "base_model.json").read_text()).name
    source = str((micro_world / "base").resolve())
    (first,) = tick(sensor, registry, instance).run_requests  # no gates yet: the first ones
    assert first.run_config == {"ops": {"registry_gates": {"config": {
        "base": source, "base_model": base_model, "where": "", "size": 0}}}}
    assert "no gates for" in first.tags["autolora/reason"] and first.tags["autolora/base"] == source

    job = gates_retrain_job.resolve(asset_graph=defs.resolve_asset_graph())
    resources = {"registry": RegistryResource(path=str(registry))}
    config = first.run_config["ops"]["registry_gates"]["config"]
    run = job.execute_in_process(run_config={"ops": {"registry_gates": {"config": {**config, "steps": 3}}}},
                                 instance=instance, resources=resources)
    assert run.success
    trained = load_gates(_newest_gates(reg, source)).version
    assert f"0 new LoRA(s) with sample renders since gates {trained}" in skipped(tick(sensor, registry, instance))

    arrivals = tmp_path / "arrivals"  # new LoRAs with their cards and previews; a bare one does not count
    arrivals.mkdir()
    for file in (micro_world / "heldout_loras").glob("bg-plain.*"):
        shutil.copy(file, arrivals)
    shutil.copy(micro_world / "heldout_loras" / "rhombus-lined.safetensors", arrivals)
    assert len(Registry.open(registry).add(arrivals).added) == 2
    reason = skipped(tick(sensor, registry, instance))
    assert "1 new LoRA(s) with sample renders" in reason and "retrain at 2" in reason
    assert "without sample renders do not count" in reason

    for file in (micro_world / "heldout_loras").glob("red-diamond.*"):
        shutil.copy(file, arrivals)
    assert len(Registry.open(registry).add(arrivals).added) == 1
    (request,) = tick(sensor, registry, instance).run_requests
    assert request.run_config["ops"]["registry_gates"]["config"] == {  # the newest gates' recipe and size
        "base": source, "base_model": base_model, "where": "", "size": 32, **RECIPE_FIELDS, "steps": 3}
    assert "2 new LoRA(s)" in request.tags["autolora/reason"]

    run = job.execute_in_process(run_config=request.run_config, instance=instance, resources=resources)
    assert run.success
    (materialization,) = run.asset_materializations_for_node("registry_gates")
    reg = Registry.open(registry)
    grown = sorted(r["lora_id"] for r in reg.rows(reg.loras, "true", len(reg)) if render_pairs(reg, r))
    newest = load_gates(_newest_gates(reg, source))  # the one generation now picks: the grown pool's
    assert newest.version == materialization.metadata["version"].value != trained
    assert newest.meta["pool"] == grown and materialization.metadata["pool_size"].value == len(grown)
    assert request.run_key == f"{base_model}:{gate_pool_hash(source, base_model, grown)}"
    assert "0 new LoRA(s)" in skipped(tick(sensor, registry, instance))


def test_without_a_base_the_sensor_says_how_to_configure_one(tmp_path, monkeypatch):
    monkeypatch.delenv("AUTOLORA_GATES_BASE", raising=False)
    monkeypatch.chdir(tmp_path)  # no demo world here either
    assert default_gates_base() == ""
    reason = skipped(tick(gates_retrain_sensor, tmp_path / "registry", dg.DagsterInstance.ephemeral()))
    assert reason == NO_BASE.format("")  # a sensor has no run config to point to
    assert "run config" not in reason
    (tmp_path / module.DEMO_WORLD).mkdir(parents=True)
    assert default_gates_base() == module.DEMO_WORLD
    monkeypatch.setenv("AUTOLORA_GATES_BASE", "owner/some-flux")
    assert default_gates_base() == "owner/some-flux"


def test_the_asset_job_and_sensor_are_registered_and_described():
    from pipelines.train_gates import GateRecipe

    repo = defs.get_repository_def()
    assert repo.has_job("gates_retrain_job")
    assert repo.get_job("gates_retrain_job").asset_layer.selected_asset_keys == {dg.AssetKey("registry_gates")}
    sensor = repo.get_sensor_def("gates_retrain_sensor")
    assert sensor.job_name == "gates_retrain_job" and sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert sensor.minimum_interval_seconds == repo.get_sensor_def("encoder_retrain_sensor").minimum_interval_seconds
    assert defs.resolve_assets_def("registry_gates").group_names_by_key[dg.AssetKey("registry_gates")] == "models"
    assert {k.path[0] for k in defs.resolve_assets_def("registry_gates").asset_deps[dg.AssetKey("registry_gates")]} \
        == {"ingested_loras", "synced_loras", "lora_captions"}
    assert RECIPE_FIELDS == {k: getattr(GateRecipe(), k) for k in RECIPE_FIELDS}  # the recipe's own defaults
    fields = RegistryGatesConfig.to_config_schema().as_field().config_type.fields
    assert {"base", "base_model", "where", "size", "steps", "seed"} <= set(fields)
    assert [name for name, spec in fields.items() if not spec.description] == []
