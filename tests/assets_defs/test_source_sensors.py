"""Source sensors and the ingest asset as a new user meets them: the shipped defaults point at the
demo world's LoRAs, a missing folder, a bad sources.toml and an unreachable Hub each say what is
wrong; each registry keeps its own cursor, and a file rejected for its base comes back once the
base is registered (the sensors' happy path: test_captions_sources.py)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import dagster as dg
import pytest

import huggingface_hub.constants as hf_constants
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))
from flux_fixtures import flux_lora, partial_names, tiny_flux_base  # noqa: E402

from assets_defs.ingest import IngestConfig, ingested_loras  # noqa: E402
from assets_defs.resources import RegistryResource  # noqa: E402
from assets_defs.sources import source_sensor, source_sensors, synced_loras  # noqa: E402
from pipelines.sources.cursors import cursor_path  # noqa: E402
from pipelines.sources.local import DEMO_LORAS  # noqa: E402
from registry.lora.formats import save_lora  # noqa: E402


def _context(tmp_path, cursor=None):
    return dg.build_sensor_context(cursor=cursor, resources={"registry": RegistryResource(path=str(tmp_path / "reg"))})


def test_ingest_defaults_to_the_demo_world_and_fails_when_nothing_exists(tmp_path, monkeypatch):
    if "AUTOLORA_WATCH_DIR" not in os.environ:
        assert IngestConfig().paths == [DEMO_LORAS]
    monkeypatch.chdir(tmp_path)  # no demo world here: the default config finds nothing
    with pytest.raises(dg.Failure, match=r"none of the paths exist: \['"):
        dg.materialize([ingested_loras], resources={"registry": RegistryResource(path=str(tmp_path / "reg"))},
                       instance=dg.DagsterInstance.ephemeral())


def test_missing_local_folder_is_the_skip_reason(tmp_path):
    toml = tmp_path / "sources.toml"
    toml.write_text('[[source]]\nkind = "local"\nfolder = "not-there"\n')
    (sensor,) = source_sensors(str(toml), str(tmp_path / "downloads"))
    result = sensor(_context(tmp_path))
    assert isinstance(result, dg.SkipReason)
    assert f"{tmp_path / 'not-there'} does not exist" in result.skip_message
    assert str(toml) in result.skip_message  # where to fix it


def test_a_source_disabled_after_loading_skips_with_the_reason(tmp_path):
    """Sensors are made when the code location loads; an entry disabled since then skips, never fails."""
    toml = tmp_path / "sources.toml"
    (tmp_path / "loras").mkdir()
    toml.write_text('[[source]]\nkind = "local"\nname = "mine"\nfolder = "loras"\n')
    (sensor,) = source_sensors(str(toml), str(tmp_path / "downloads"))
    toml.write_text('[[source]]\nkind = "local"\nname = "mine"\nfolder = "loras"\nenabled = false\n')
    result = sensor(_context(tmp_path))
    assert isinstance(result, dg.SkipReason)
    assert "no enabled source named 'mine'" in result.skip_message and "reload the code location" in result.skip_message


def test_a_sources_file_deleted_after_loading_skips_with_the_reason(tmp_path):
    toml = tmp_path / "sources.toml"
    (tmp_path / "loras").mkdir()
    toml.write_text('[[source]]\nkind = "local"\nname = "mine"\nfolder = "loras"\n')
    (sensor,) = source_sensors(str(toml), str(tmp_path / "downloads"))
    toml.unlink()
    result = sensor(_context(tmp_path))
    assert isinstance(result, dg.SkipReason)
    assert f"{toml}: cannot read the sources file" in result.skip_message
    assert "reload the code location" in result.skip_message


def test_a_missing_autolora_sources_fails_the_load_naming_variable_and_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOLORA_SOURCES", "nosuch.toml")
    with pytest.raises(ValueError, match=f"AUTOLORA_SOURCES=nosuch.toml: no such sources file: {tmp_path}/nosuch.toml"):
        source_sensors()
    with pytest.raises(ValueError, match="no such sources file"):  # a file passed explicitly, too
        source_sensors(str(tmp_path / "nosuch.toml"))


def test_a_missing_default_sources_toml_warns_and_makes_no_sensors(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # dagster started elsewhere: no sources.toml here
    monkeypatch.delenv("AUTOLORA_SOURCES", raising=False)
    with caplog.at_level("WARNING"):
        assert source_sensors() == []
    assert f"no source sensors: no sources file at {tmp_path / 'sources.toml'}" in caplog.text


@pytest.mark.parametrize("text, message", [
    ('[[source]\nkind = "local"\n', "not valid TOML"),
    ('[source]\nkind = "local"\n', "must be an array of tables"),
    ('[[source]]\nkind = "local"\nfolder = 3\n', "folder must be a string"),
])
def test_bad_sources_toml_is_one_clear_error_at_load(tmp_path, text, message):
    toml = tmp_path / "sources.toml"
    toml.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        source_sensors(str(toml))
    assert type(error.value) is ValueError and str(toml) in str(error.value)


def test_unreachable_hub_skips_the_tick(tmp_path, monkeypatch):
    """HF_ENDPOINT at a closed port: huggingface_hub retries (~23 s), then the tick skips."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    toml = tmp_path / "sources.toml"
    toml.write_text(f'[[source]]\nkind = "hub"\nendpoint = "http://127.0.0.1:{port}"\n')
    result = source_sensor("hub", str(toml), str(tmp_path / "dl"))(_context(tmp_path))
    assert isinstance(result, dg.SkipReason) and "hub: listing failed: network" in result.skip_message
    assert "ConnectError" in result.skip_message


class _Ticks:
    """Ticks of one local source's sensor against the registry given each time, the sensor's
    cursor carried from tick to tick as Dagster does."""

    def __init__(self, tmp_path):
        (tmp_path / "loras").mkdir()
        toml = tmp_path / "sources.toml"
        toml.write_text('[[source]]\nkind = "local"\nname = "mine"\nfolder = "loras"\n')
        (self.sensor,) = source_sensors(str(toml), str(tmp_path / "downloads"))
        self.folder, self.cursor = tmp_path / "loras", None

    def __call__(self, registry: RegistryResource) -> list[dg.RunRequest]:
        result = self.sensor(dg.build_sensor_context(cursor=self.cursor, resources={"registry": registry}))
        self.cursor = getattr(result, "cursor", None) or self.cursor
        return list(getattr(result, "run_requests", None) or [])


def _run(request: dg.RunRequest, registry: RegistryResource) -> dict:
    run = dg.materialize([synced_loras], resources={"registry": registry}, run_config=request.run_config,
                         instance=dg.DagsterInstance.ephemeral())
    assert run.success
    return {k: v.value for k, v in run.asset_materializations_for_node("synced_loras")[0].metadata.items()}


def test_each_registry_keeps_its_own_cursor(tmp_path):
    """The sensor's cursor is the registry's (REGISTRY/sync/, as `autolora sync` keeps it): another
    registry under the same Dagster instance is synced from the start."""
    tick = _Ticks(tmp_path)
    save_lora(tick.folder / "one.safetensors", flux_lora(partial_names((1,), (), attention_only=True), seed=1),
              "diffusers")
    first, second = RegistryResource(path=str(tmp_path / "first")), RegistryResource(path=str(tmp_path / "second"))
    (request,) = tick(first)
    assert _run(request, first)["added"] == 1
    assert cursor_path(first.open().root, "mine").is_file()
    assert tick(first) == []  # nothing new for this registry
    (other,) = tick(second)  # a new registry: everything is new to it
    assert other.run_key != request.run_key and _run(other, second)["added"] == 1
    assert len(second.open()) == 1 and tick(second) == [] and tick(first) == []


def test_a_file_rejected_for_its_base_is_synced_again_after_register_base(tmp_path):
    tick = _Ticks(tmp_path)
    base = tiny_flux_base()
    save_lora(tick.folder / "tiny.safetensors", flux_lora(list(base.layer_shapes)[:4], rank=2, base=base), "diffusers")
    registry = RegistryResource(path=str(tmp_path / "reg"))
    (first,) = tick(registry)
    assert _run(first, registry)["rejected"] == 1  # unknown_base: left out of the registry's cursor
    (retry,) = tick(registry)  # listed again
    assert _run(retry, registry)["rejected"] == 1
    (waiting,) = tick(registry)
    assert waiting.run_key == retry.run_key  # same bases, same listing: Dagster drops a run key already used
    registry.open().register_base(base)
    (after,) = tick(registry)
    assert after.run_key not in {first.run_key, retry.run_key}
    meta = _run(after, registry)
    assert meta["added"] == 1 and meta["rejected"] == 0
    assert tick(registry) == []


def test_a_sync_run_accounts_for_files_already_known(tmp_path):
    """Files the registry already holds are counted (unchanged), not left out of the metadata."""
    tick = _Ticks(tmp_path)
    lora = flux_lora(partial_names((1,), (), attention_only=True), seed=1)
    save_lora(tick.folder / "one.safetensors", lora, "diffusers")
    registry = RegistryResource(path=str(tmp_path / "reg"))
    registry.open(create=True).add([tick.folder / "one.safetensors"])
    (request,) = tick(registry)
    meta = _run(request, registry)
    assert (meta["discovered"], meta["added"], meta["unchanged"], meta["duplicates"]) == (1, 0, 1, 0)
