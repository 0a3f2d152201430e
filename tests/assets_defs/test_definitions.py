"""The Dagster code location loads, the ingest asset materialises (source sensors: see
test_captions_sources.py)."""

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
from registry.lora.formats import save_lora  # noqa: E402
from registry import Registry  # noqa: E402


def test_definitions_validate():
    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    assert repo.has_job("ingest_job")
    # sources.toml's enabled entries, then the automation (tests/assets_defs/test_automation.py)
    assert {s.name for s in repo.sensor_defs} == {"local_source_sensor", "encoder_retrain_sensor", "gates_retrain_sensor",
                                                  "registry_automation"}
    for job in ("retrieval_job", "source_sync_job", "retrain_job", "gates_retrain_job", "maintenance_job",
                "reports_job"):
        assert repo.has_job(job)


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


def test_committed_instance_config_loads(tmp_path):
    import shutil

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "dagster_home" / "dagster.yaml", home)
    instance = dg.DagsterInstance.from_config(str(home))
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 1


def test_every_config_field_is_described_for_the_launchpad():
    """The Dagster launchpad shows each config field's description: none may be bare."""
    import inspect

    import dagster as dg

    from assets_defs import captions, definitions, generation, ingest, models, registry_gates, retrieval_report, sources

    schemas = {f"resource {name}": type(res) for name, res in (definitions.defs.resources or {}).items()}
    for module in (captions, generation, ingest, models, registry_gates, retrieval_report, sources):
        schemas.update({name: obj for name, obj in vars(module).items()
                        if inspect.isclass(obj) and issubclass(obj, dg.Config) and obj.__module__ == module.__name__})
    assert {"resource registry", "resource captioner", "GatesConfig", "SyncConfig", "IngestConfig",
            "RegistryGatesConfig"} <= set(schemas)
    bare = [f"{name}.{field}" for name, cls in schemas.items()
            for field, spec in cls.to_config_schema().as_field().config_type.fields.items() if not spec.description]
    assert bare == []


def test_each_report_shows_only_the_fields_it_uses():
    from assets_defs.generation import FusionReportConfig, ReportConfig

    fields = {cls: set(cls.to_config_schema().as_field().config_type.fields) for cls in (ReportConfig, FusionReportConfig)}
    assert fields[ReportConfig] == {"world", "out", "prompts"}  # the generation report has no LoRA sets
    assert fields[FusionReportConfig] == {"world", "out", "prompts", "sets"}
