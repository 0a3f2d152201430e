"""Captioning a registry through the real vLLM OpenAI server (.venv-vllm, a random tiny Qwen2-VL):
every render captioned once, a second pass sends nothing, a LoRA without renders is rendered by
the micro world's base with the LoRA active and captioned, and a dead endpoint loses nothing."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import requests
from diffusers import FluxPipeline
from PIL import Image
from caption_fixtures import WITH_RENDERS, WITHOUT, captioning_registry

from pipelines.caption import Captioner
from pipelines.caption_registry import (
    caption_registry, idle_report, pending_captions, render_seed, render_with_base, self_render_prompts,
)
from pipelines.vllm_server import free_port, vllm_available, vllm_python, vllm_server
from pipelines.world.captioner import build_random_captioner
from pipelines.world.sampling import generate
from registry import Registry
from registry.captions import SELF_RENDERED
from registry.lora.inspect import load_canonical



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not vllm_available():
        pytest.skip(f"no vLLM environment at {vllm_python()} (bin/setup-vllm creates it)")
    folder = build_random_captioner(tmp_path_factory.mktemp("model") / "tiny-qwen2-vl", seed=0)
    t0 = time.perf_counter()
    with vllm_server(folder, startup_timeout=600) as srv:
        print(f"\nvLLM server up in {time.perf_counter() - t0:.1f} s")
        yield srv


@pytest.fixture(scope="module")
def registry(micro_world, tmp_path_factory) -> Registry:
    return captioning_registry(micro_world, tmp_path_factory.mktemp("capreg"))


def _served_requests(srv) -> float:
    """Requests the vLLM server has finished, from its Prometheus metrics (its own count, not ours)."""
    text = requests.get(srv.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))


def _rows(reg: Registry) -> dict[str, dict]:
    return {r["name"]: reg.get(r["lora_id"]) for r in reg.column_rows(reg.loras, ["lora_id", "name"])}


def test_dead_endpoint_fails_rows_and_writes_nothing(registry):
    version = registry.version
    with Captioner(f"http://127.0.0.1:{free_port()}/v1", "m", retries=0, timeout=5) as cap:
        report = caption_registry(registry, cap)
    assert report.captioned == 0 and report.writes == 0 and registry.version == version
    # refused connections: the pass stops, both LoRAs left for a rerun (not failed one by one)
    assert not report.failed and report.left == 2 and "refuses connections" in report.stopped
    assert report.skipped[0]["lora_id"] == _rows(registry)[WITHOUT]["lora_id"]
    # what a pass could caption: the render-less LoRA only when its base can render it
    assert pending_captions(registry, "m") == 2
    assert pending_captions(registry, "m", {"autolora-demo-flux": "any"}) == 3
    assert pending_captions(registry, "m", {"autolora-demo-flux": "any"}, self_render=False) == 2
    # a base that does not load fails that LoRA with the reason, and the pass goes on
    with Captioner(f"http://127.0.0.1:{free_port()}/v1", "m", retries=0, timeout=5) as cap:
        report = caption_registry(registry, cap, base_pipelines={"autolora-demo-flux": "nobody/not-cached-flux"})
    assert registry.version == version and not report.skipped and len(report.failed) == 1 and report.left == 2
    failed = {f["lora_id"]: f["reason"] for f in report.failed}
    assert "not in the local Hugging Face cache" in failed[_rows(registry)[WITHOUT]["lora_id"]]


def test_captions_every_render_once_then_self_renders(server, registry, micro_world, tmp_path):
    rows = _rows(registry)
    renders = sum(len(rows[t]["render_blobs"]) for t in WITH_RENDERS)
    assert renders == 3 and rows[WITHOUT]["render_blobs"] == []
    served, version = _served_requests(server), registry.version
    with Captioner(server.base_url, server.model, cache_dir=tmp_path, concurrency=3, max_tokens=12) as cap:
        # without a base pipeline the render-less LoRA waits, with the reason
        first = caption_registry(registry, cap)
        assert first.captioned == 2 and first.requests == renders and first.writes == 1
        assert first.images == first.requests + first.cached and first.cached == 0
        assert _served_requests(server) - served == renders and registry.version == version + 1
        assert [s["lora_id"] for s in first.skipped] == [rows[WITHOUT]["lora_id"]]
        assert "autolora-demo-flux" in first.skipped[0]["reason"]
        # nothing left that a pass could caption: the report a pass gives, made without a captioner
        assert pending_captions(registry, server.model) == 0
        idle = idle_report(registry, server.model)
        assert (idle.up_to_date, idle.skipped, idle.requests) == (2, first.skipped, 0)
        # with the base: only that LoRA is rendered (3 renders) and captioned
        second = caption_registry(registry, cap, base_pipelines={"autolora-demo-flux": micro_world / "base"})
        print(f"\ncaptioned {first.requests + second.requests} images: "
              f"{json.dumps(first.to_dict())}\n{json.dumps(second.to_dict())}")
    assert second.up_to_date == 2 and second.captioned == 1 and not second.skipped and not second.failed
    assert second.self_rendered == {rows[WITHOUT]["lora_id"]: 3} and second.requests == 3
    after = _rows(registry)
    for name, row in after.items():
        assert row["caption_model"] == server.model and len(row["captions"]) == len(row["render_blobs"])
        assert all(c in row["search_text"] for c in row["captions"] if c.strip())
        assert all((registry.root / b).is_file() for b in row["render_blobs"])
    for name in WITH_RENDERS:  # published renders kept as they were
        assert after[name]["render_blobs"] == rows[name]["render_blobs"]
    made = after[WITHOUT]
    assert made["render_prompts"] == [SELF_RENDERED + p for p in self_render_prompts(made["trigger_words"], 3)]
    images = np.stack([np.asarray(Image.open(registry.root / b)) for b in made["render_blobs"]])
    assert images.shape == (3, 32, 32, 3)
    # the LoRA was active: the base alone draws something else from the same prompts and seed
    pipe = FluxPipeline.from_pretrained(micro_world / "base")
    pipe.set_progress_bar_config(disable=True)
    prompts = self_render_prompts(made["trigger_words"], 3)
    seed = render_seed(made["lora_id"], 0)
    lora, _ = load_canonical(registry.root / made["blob"], registry.bases())
    assert np.array_equal(render_with_base(pipe, lora.layers, prompts, seed), images)  # deterministic
    assert np.abs(generate(pipe, prompts, seed).astype(int) - images).mean() > 1.0


def test_second_pass_sends_nothing(server, registry):
    served, version = _served_requests(server), registry.version
    with Captioner(server.base_url, server.model, max_tokens=12) as cap:  # no cache: only the registry knows
        report = caption_registry(registry, cap)
    assert report.requests == 0 and report.captioned == 0 and report.up_to_date == 3 and report.writes == 0
    assert _served_requests(server) == served and registry.version == version


def test_a_row_an_ingest_refreshes_while_it_is_captioned_keeps_its_new_render(server, micro_world, tmp_path,
                                                                              monkeypatch):
    """A preview arrives (and an ingest refreshes the row) while the captioner runs: the pass's write
    used to put the planned render list back, and the next ingest said "unchanged", so the preview
    was lost for good. Now the row is left for the next pass, which captions all its renders."""
    import pipelines.caption_registry as caption_registry_module

    reg = captioning_registry(micro_world, tmp_path)
    folder = tmp_path / "loras"
    real = caption_registry_module._Pass._captions

    def meanwhile(self, plans, rows):
        if not (folder / "square.preview-2.png").exists():
            Image.new("RGB", (32, 32), (0, 200, 0)).save(folder / "square.preview-2.png")
            assert reg.add([folder]).refreshed
        return real(self, plans, rows)

    monkeypatch.setattr(caption_registry_module._Pass, "_captions", meanwhile)
    with Captioner(server.base_url, server.model, max_tokens=12) as cap:
        report = caption_registry(reg, cap)
    square = _rows(reg)["square"]
    assert len(square["render_blobs"]) == 3 and square["caption_model"] != server.model
    assert [s["name"] for s in report.skipped if "changed while it was captioned" in s["reason"]] == ["square"]
    monkeypatch.undo()
    with Captioner(server.base_url, server.model, max_tokens=12) as cap:
        again = caption_registry(reg, cap)
    square = _rows(reg)["square"]
    assert again.captioned == 1 and square["caption_model"] == server.model and len(square["captions"]) == 3
