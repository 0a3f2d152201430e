"""The weekly full crawl of a downloading source: a schedule per enabled Hub / Civitai entry whose run
lists the source from the start, so a card edited upstream reaches the registry (the sensors only see
what is newer than their cursor). Against the docs-shaped fake Civitai on 127.0.0.1."""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines" / "sources"))
from source_fixtures import lora_bytes  # noqa: E402
from test_sync_refresh import EditableCivitai  # noqa: E402

from assets_defs.resources import RegistryResource  # noqa: E402
from assets_defs.sources import source_crawl_schedules, source_sensors, synced_loras  # noqa: E402


def _materialize(run_config: dict, registry: RegistryResource) -> dict:
    run = dg.materialize([synced_loras], resources={"registry": registry}, run_config=run_config,
                         instance=dg.DagsterInstance.ephemeral())
    assert run.success
    return {k: v.value for k, v in run.asset_materializations_for_node("synced_loras")[0].metadata.items()}


def test_the_weekly_full_crawl_brings_an_upstream_edit_into_the_registry(httpserver, tmp_path):
    civitai = EditableCivitai(httpserver, [lora_bytes(tmp_path, seed) for seed in (1, 2, 3)])
    (tmp_path / "mine").mkdir()
    toml = tmp_path / "sources.toml"
    toml.write_text(f'[[source]]\nkind = "civitai"\nname = "civ"\nbase_url = "{httpserver.url_for("/").rstrip("/")}"\n'
                    'page_size = 10\n\n[[source]]\nkind = "local"\nname = "mine"\nfolder = "mine"\n')
    downloads = str(tmp_path / "dl")
    (schedule,) = source_crawl_schedules(str(toml), downloads)  # none for the local folder
    assert schedule.name == "civ_full_crawl_schedule" and schedule.cron_schedule == "0 5 * * 6"
    registry = RegistryResource(path=str(tmp_path / "reg"))

    sensor = next(s for s in source_sensors(str(toml), downloads) if s.name == "civ_source_sensor")
    (first,) = sensor(dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral()), registry=registry).run_requests
    assert _materialize(first.run_config, registry)["added"] == 3
    civitai.edits[2] = {"trainedWords": ["inkfox"]}
    skip = sensor(dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral()), registry=registry)
    assert isinstance(skip, dg.SkipReason)  # nothing newer than the cursor: the sensor cannot see the edit

    (crawl,) = schedule.evaluate_tick(dg.build_schedule_context()).run_requests
    meta = _materialize(crawl.run_config, registry)
    assert (meta["cards_refreshed"], meta["refreshed"], meta["added"], meta["gone_upstream"]) == (1, 1, 0, 0)
    hit = registry.open_existing().search("inkfox", k=1, channel="text")[0]
    assert hit.name == "Watercolour 2" and hit.trigger_words == ["inkfox"]
