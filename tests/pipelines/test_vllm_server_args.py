"""The vLLM server's command line and environment, built without starting a server: a model folder
or a Hub id, the CPU defaults and their overrides, HF_HUB_OFFLINE, and the Dagster resource's config."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import pytest

from pipelines import vllm_server as vs

HUB_ID = "Qwen/Qwen2.5-VL-7B-Instruct"


def _flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_hub_id_is_passed_as_is():
    cmd = vs.server_command(HUB_ID, 8000)
    assert _flag(cmd, "--model") == HUB_ID and _flag(cmd, "--served-model-name") == HUB_ID
    assert vs.default_served_name(HUB_ID) == HUB_ID and vs.is_model_source(HUB_ID)


def test_existing_folder_is_resolved(tmp_path, monkeypatch):
    (tmp_path / "Qwen" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cmd = vs.server_command("Qwen/tiny", 8000, served_name="cap")
    assert _flag(cmd, "--model") == str(tmp_path / "Qwen" / "tiny") and _flag(cmd, "--served-model-name") == "cap"
    assert vs.default_served_name("Qwen/tiny").startswith("tiny-")


def test_neither_folder_nor_hub_id():
    assert not vs.is_model_source("/no/such/model/folder") and not vs.is_model_source("a/b/c")
    assert not vs.is_model_source("captionr")  # a bare word: a mistyped folder, not a Hub id


def test_default_served_name_follows_the_model_content(tmp_path):
    """A retrained model saved in the same folder is another model: another name, so another cache key."""
    folder = tmp_path / "captioner"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    first = vs.default_served_name(folder)
    assert first.startswith("captioner-") and first == vs.default_served_name(folder)  # stable
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\1" * 8)
    retrained = vs.default_served_name(folder)  # same config, same shapes, other weights
    assert retrained != first and retrained.startswith("captioner-")
    (folder / "config.json").write_text('{"hidden_size": 16}')
    assert vs.default_served_name(folder) not in (first, retrained)
    assert vs.server_command(folder, 8000)[vs.server_command(folder, 8000).index("--served-model-name") + 1] == \
        vs.default_served_name(folder)


def test_cpu_defaults_and_overrides():
    cmd = vs.server_command("m", 8000)
    assert _flag(cmd, "--dtype") == "float32" and _flag(cmd, "--max-model-len") == "256"
    cmd = vs.server_command("m", 8000, dtype="bfloat16", max_model_len=4096, extra_args=["--gpu-memory-utilization",
                                                                                        "0.8"])
    assert _flag(cmd, "--dtype") == "bfloat16" and _flag(cmd, "--max-model-len") == "4096"
    assert cmd[-2:] == ["--gpu-memory-utilization", "0.8"]
    cmd = vs.server_command("m", 8000, dtype=None, max_model_len=None)
    assert "--dtype" not in cmd and "--max-model-len" not in cmd


def test_env_offline_by_default_but_respects_the_user(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert vs.server_env()["HF_HUB_OFFLINE"] == "1" and vs.server_env()["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert vs.server_env(offline=False)["HF_HUB_OFFLINE"] == "0"
    assert "VLLM_CPU_KVCACHE_SPACE" not in vs.server_env(kv_cache_gib=None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert vs.server_env()["HF_HUB_OFFLINE"] == "0" and vs.server_env(offline=True)["HF_HUB_OFFLINE"] == "1"


class _ExitedAtOnce:
    """A stand-in for the server process: records its command and environment, has already exited."""

    calls: list[dict] = []

    def __init__(self, cmd, **kwargs):
        self.calls.append({"cmd": cmd, "env": kwargs["env"]})
        self.pid, self.returncode = -1, 3

    def poll(self) -> int:
        return self.returncode


@pytest.fixture
def fake_popen(monkeypatch):
    monkeypatch.setenv(vs.VLLM_PYTHON_ENV, sys.executable)  # vllm_available()
    monkeypatch.setattr(vs.subprocess, "Popen", _ExitedAtOnce)
    monkeypatch.setattr(vs, "_stop", lambda proc: None)  # the fake has no process group to stop
    _ExitedAtOnce.calls.clear()
    return _ExitedAtOnce.calls


def test_vllm_server_passes_hub_id_and_settings(fake_popen, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(vs.VLLMServerError, match="exited with code 3"):
        with vs.vllm_server(HUB_ID, dtype=None, max_model_len=8192, extra_args=["--limit-mm-per-prompt", "{}"]):
            pass
    (call,) = fake_popen
    assert _flag(call["cmd"], "--model") == HUB_ID and "--dtype" not in call["cmd"]
    assert _flag(call["cmd"], "--max-model-len") == "8192" and call["cmd"][-2:] == ["--limit-mm-per-prompt", "{}"]
    assert call["env"]["HF_HUB_OFFLINE"] == "0"


def test_vllm_server_rejects_a_missing_folder_before_starting(fake_popen):
    with pytest.raises(vs.VLLMServerError, match="neither an existing model folder nor a Hub repo id"):
        with vs.vllm_server("/no/such/model/folder"):
            pass
    assert fake_popen == []


def test_captioner_resource_config_reaches_the_server(monkeypatch):
    from assets_defs import captions
    from pipelines import captioner_endpoint

    seen = {}

    @contextmanager
    def fake_server(model, **kwargs):
        seen.update(kwargs, model=model)
        yield vs.VLLMServer(base_url="http://127.0.0.1:1/v1", model=kwargs["served_name"] or model)

    @contextmanager
    def fake_captioner(base_url, model, **kwargs):
        yield model

    monkeypatch.setattr(captioner_endpoint, "vllm_server", fake_server)  # where the resource's connect() goes
    monkeypatch.setattr(captioner_endpoint, "Captioner", fake_captioner)
    resource = captions.CaptionerResource(url="", model_dir=HUB_ID, max_model_len=None, dtype="bfloat16",
                                          extra_args=["--gpu-memory-utilization", "0.8"])
    assert resource.model_name() == HUB_ID
    with resource.connect() as (cap, info):
        assert cap == HUB_ID and info["pid"] is None
    assert seen["model"] == HUB_ID and seen["max_model_len"] is None and seen["dtype"] == "bfloat16"
    assert seen["extra_args"] == ["--gpu-memory-utilization", "0.8"]
    default = captions.CaptionerResource(url="", model_dir="x")
    assert (default.max_model_len, default.dtype, default.extra_args) == (256, "float32", [])
