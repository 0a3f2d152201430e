"""Source sensors and the ingest asset as a new user meets them: the shipped defaults point at the
demo world's LoRAs, a missing folder, a bad sources.toml and an unreachable Hub each say what is
wrong (the sensors' happy path: test_captions_sources.py)."""

from __future__ import annotations

import os
import socket
import dagster as dg
import pytest

import huggingface_hub.constants as hf_constants
from assets_defs.ingest import IngestConfig, ingested_loras
from assets_defs.resources import RegistryResource
from assets_defs.sources import source_sensor, source_sensors
from pipelines.sources.local import DEMO_LORAS


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
    result = sensor(dg.build_sensor_context(cursor=None))
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
    result = sensor(dg.build_sensor_context(cursor=None))
    assert isinstance(result, dg.SkipReason)
    assert "no enabled source named 'mine'" in result.skip_message and "reload the code location" in result.skip_message


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
    result = source_sensor("hub", str(toml), str(tmp_path / "dl"))(dg.build_sensor_context(cursor=None))
    assert isinstance(result, dg.SkipReason) and "hub: listing failed: network" in result.skip_message
    assert "ConnectError" in result.skip_message
