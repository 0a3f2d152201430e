"""The Dagster code location loads, the ingest asset materialises, the folder sensor requests runs."""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))
from flux_fixtures import flux_lora, partial_names  # noqa: E402

from assets_defs.definitions import defs  # noqa: E402
from assets_defs.ingest import ingested_loras  # noqa: E402
from assets_defs.maintenance import registry_indexes  # noqa: E402
from assets_defs.resources import RegistryResource  # noqa: E402
from assets_defs.sensors import local_folder_sensor  # noqa: E402
from registry.lora.formats import save_lora  # noqa: E402
from registry import Registry  # noqa: E402


def test_definitions_validate():
    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    assert repo.has_job("ingest_job")
    assert {s.name for s in repo.sensor_defs} == {"local_folder_sensor"}


def test_ingest_asset_materialises_in_process(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    save_lora(folder / "a.safetensors", flux_lora(partial_names((1,), (), attention_only=True), seed=1), "kohya")
    (folder / "bad.pt").write_bytes(b"\x80\x04K\x01.")
    registry = tmp_path / "registry"
    result = dg.materialize(
        [ingested_loras], resources={"registry": RegistryResource(path=str(registry))},
        run_config={"ops": {"ingested_loras": {"config": {"paths": [str(folder)]}}}},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    metadata = result.asset_materializations_for_node("ingested_loras")[0].metadata
    assert metadata["added"].value == 1 and metadata["rejected"].value == 1
    reg = Registry.open(registry)
    assert len(reg) == 1

    maintained = dg.materialize([registry_indexes], resources={"registry": RegistryResource(path=str(registry))},
                                instance=dg.DagsterInstance.ephemeral())
    assert maintained.success
    assert maintained.asset_materializations_for_node("registry_indexes")[0].metadata["yielded"].value == 0
    assert all(reg.loras.index_stats(i.name).num_unindexed_rows == 0 for i in reg.loras.list_indices())


def test_folder_sensor_requests_runs_for_new_files_only(tmp_path, monkeypatch):
    folder = tmp_path / "watched"
    folder.mkdir()
    monkeypatch.setenv("AUTOLORA_WATCH_DIR", str(folder))
    save_lora(folder / "one.safetensors", flux_lora(partial_names((1,), ()), seed=2), "diffusers")
    (folder / "one.json").write_text("{}")  # a sidecar alone is no candidate
    first = local_folder_sensor(dg.build_sensor_context(cursor=None))
    assert len(first.run_requests) == 1
    paths = first.run_requests[0].run_config["ops"]["ingested_loras"]["config"]["paths"]
    assert paths == [str(folder / "one.safetensors")]
    again = local_folder_sensor(dg.build_sensor_context(cursor=first.cursor))
    assert not again.run_requests
    save_lora(folder / "two.safetensors", flux_lora(partial_names((3,), ()), seed=3), "diffusers")
    third = local_folder_sensor(dg.build_sensor_context(cursor=first.cursor))
    assert [r.run_config["ops"]["ingested_loras"]["config"]["paths"] for r in third.run_requests] == [
        [str(folder / "two.safetensors")]]
    (folder / "two.json").write_text('{"name": "Two"}')  # a new card is a change: the row is refreshed
    fourth = local_folder_sensor(dg.build_sensor_context(cursor=third.cursor))
    assert [r.run_config["ops"]["ingested_loras"]["config"]["paths"] for r in fourth.run_requests] == [
        [str(folder / "two.safetensors")]]


def test_committed_instance_config_loads(tmp_path):
    import shutil

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "dagster_home" / "dagster.yaml", home)
    instance = dg.DagsterInstance.from_config(str(home))
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
