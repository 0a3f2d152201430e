"""The captioner resource (launches the real vLLM server from .venv-vllm and stops it by PID, or
attaches to a running one and leaves it running), the ``lora_captions`` asset, and the
per-source discovery sensors with their cursors, run keys and the ``synced_loras`` runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import dagster as dg
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))
from flux_fixtures import flux_lora, partial_names  # noqa: E402

from assets_defs.captions import CaptionerResource, lora_captions  # noqa: E402
from assets_defs.resources import RegistryResource  # noqa: E402
from assets_defs.sources import source_sensors, synced_loras  # noqa: E402
from pipelines.vllm_server import default_served_name, served_models, vllm_available, vllm_python  # noqa: E402
from pipelines.world.captioner import build_random_captioner  # noqa: E402
from registry import Registry  # noqa: E402
from registry.lora.formats import save_lora  # noqa: E402


def _lora(folder: Path, stem: str, seed: int, render: bool = False) -> None:
    save_lora(folder / f"{stem}.safetensors", flux_lora(partial_names((seed,), (), attention_only=True), seed=seed),
              "diffusers")
    if render:
        Image.new("RGB", (16, 16), (40 * seed % 255, 90, 200)).save(folder / f"{stem}.preview.png")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_resource_needs_a_url_or_a_model():
    with pytest.raises(ValueError, match="url"):
        with CaptionerResource(url="", model_dir="").connect():
            pass


def test_captioner_resource_launches_attaches_and_captions(tmp_path):
    if not vllm_available():
        pytest.skip(f"no vLLM environment at {vllm_python()} (bin/setup-vllm creates it)")
    model = build_random_captioner(tmp_path / "tiny-qwen2-vl", seed=0)
    folder = tmp_path / "loras"
    folder.mkdir()
    _lora(folder, "glow", 1, render=True)
    registry = RegistryResource(path=str(tmp_path / "registry"))
    assert len(registry.open(create=True).add([folder]).added) == 1
    config = {"ops": {"lora_captions": {"config": {"self_render": False}}}}
    launch = CaptionerResource(model_dir=str(model), cache_dir="", max_tokens=8)
    name = default_served_name(model)
    assert launch.model_name() == name and name.startswith("tiny-qwen2-vl-")
    with launch.connect() as (_, started):
        pid = started["pid"]
        assert pid is not None and _alive(pid) and started["model"] == name
        attach = CaptionerResource(url=started["base_url"].removesuffix("/v1"), cache_dir="", max_tokens=8)
        result = dg.materialize([lora_captions], resources={"registry": registry, "captioner": attach},
                                run_config=config, instance=dg.DagsterInstance.ephemeral())
        assert result.success
        meta = result.asset_materializations_for_node("lora_captions")[0].metadata
        assert meta["captioned"].value == 1 and meta["requests"].value == 1 and meta["server_started"].value is False
        print(f"\nserver start {started['start_seconds']} s; caption latency {meta['seconds_per_request'].value} s")
        assert served_models(started["base_url"]) == [name]  # attaching left it running
    assert not _alive(pid)  # launched, so stopped by its PID
    row = Registry.open(tmp_path / "registry").get(registry.open().lora_ids()[0])
    assert row["caption_model"] == name and len(row["captions"]) == 1
    # nothing left to caption: the launching resource does not start a server at all
    again = dg.materialize([lora_captions], resources={"registry": registry, "captioner": launch},
                           run_config=config, instance=dg.DagsterInstance.ephemeral())
    meta = again.asset_materializations_for_node("lora_captions")[0].metadata
    assert again.success and meta["captioned"].value == 0 and meta["server_started"].value is False
    assert meta["up_to_date"].value == 1 and meta["skipped"].value == 0


def test_one_sensor_per_enabled_source_with_cursor_and_run_keys(tmp_path):
    (tmp_path / "watched").mkdir()
    toml = tmp_path / "sources.toml"
    toml.write_text('[[source]]\nkind = "local"\nname = "mine"\nfolder = "watched"\n\n'
                    '[[source]]\nkind = "hub"\nname = "hub"\nenabled = false\n')
    sensors = source_sensors(str(toml), str(tmp_path / "downloads"))
    assert [s.name for s in sensors] == ["mine_source_sensor"]
    sensor = sensors[0]
    registry = RegistryResource(path=str(tmp_path / "registry"))

    def tick():
        return sensor(dg.build_sensor_context(resources={"registry": registry}))

    empty = tick()
    assert isinstance(empty, dg.SkipReason) and empty.skip_message == "nothing new in mine"

    _lora(tmp_path / "watched", "one", 1)
    first = tick()
    (request,) = first.run_requests
    assert request.run_key.startswith("mine:") and request.tags["autolora/source"] == "mine"
    assert request.run_config["ops"]["synced_loras"]["config"]["cursor"] == ""  # this registry: from the start
    assert [r.run_key for r in tick().run_requests] == [request.run_key]  # until the run is done: a key Dagster drops

    run = dg.materialize([synced_loras], resources={"registry": registry}, run_config=request.run_config,
                         instance=dg.DagsterInstance.ephemeral())
    meta = run.asset_materializations_for_node("synced_loras")[0].metadata
    assert run.success and meta["discovered"].value == 1 and meta["added"].value == 1
    assert len(registry.open()) == 1
    assert isinstance(tick(), dg.SkipReason)  # nothing new since

    _lora(tmp_path / "watched", "two", 2)
    (request2,) = tick().run_requests
    start = json.loads(request2.run_config["ops"]["synced_loras"]["config"]["cursor"])
    assert request2.run_key != request.run_key
    assert list(start["source"]["files"]) == [str(tmp_path / "watched" / "one.safetensors")]


def test_unknown_source_in_a_run_is_a_clear_error(tmp_path):
    toml = tmp_path / "sources.toml"
    toml.write_text('[[source]]\nkind = "local"\nname = "mine"\nfolder = "watched"\n')
    config = {"ops": {"synced_loras": {"config": {"source": "nope", "sources_file": str(toml),
                                                  "download_dir": str(tmp_path / "d")}}}}
    with pytest.raises(ValueError, match="no enabled source named 'nope'"):
        dg.materialize([synced_loras], resources={"registry": RegistryResource(path=str(tmp_path / "r"))},
                       run_config=config, instance=dg.DagsterInstance.ephemeral())


def test_lora_captions_without_a_captioner_names_the_variables(tmp_path):
    Registry.open(tmp_path / "registry")
    result = dg.materialize([lora_captions], resources={"registry": RegistryResource(path=str(tmp_path / "registry")),
                                                        "captioner": CaptionerResource(url="", model_dir="")},
                            instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert "AUTOLORA_CAPTIONER_URL" in failure.step_failure_data.error.message


@pytest.mark.parametrize("value", ["{not json", '["a"]', '{"FLUX.1-dev": 3}'])
def test_a_malformed_base_pipelines_variable_is_named(monkeypatch, value):
    from assets_defs.captions import _default_bases

    monkeypatch.setenv("AUTOLORA_BASE_PIPELINES", value)
    with pytest.raises(ValueError, match="AUTOLORA_BASE_PIPELINES=.* is not a JSON object of base model name"):
        _default_bases()
    monkeypatch.setenv("AUTOLORA_BASE_PIPELINES", '{"FLUX.1-dev": "/models/flux"}')
    assert _default_bases() == {"FLUX.1-dev": "/models/flux"}
