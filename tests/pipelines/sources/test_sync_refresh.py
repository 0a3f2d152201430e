"""Releases listed again: cards rewritten when upstream changed them (Civitai on a full crawl, a Hub
repo's new commit), releases deleted upstream reported; Hub repos whose model info could not be read
are retried. Real servers on 127.0.0.1: the docs-shaped fake Civitai, the olah Hub mirror."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from source_fixtures import png_bytes
from test_sources_civitai import FakeCivitai, _json
from werkzeug import Request, Response

import huggingface_hub.constants as hf_constants
from pipelines.sources.civitai import CivitaiSource
from pipelines.sources.hub import FLUX_DEV_ADAPTERS, HubSource
from pipelines.sources.sync import sync
from registry import Registry

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hub_mirror import running_olah  # noqa: E402


class EditableCivitai(FakeCivitai):
    """The fake Civitai whose versions can be edited (``edits[i]``) or deleted with their model (``hidden``)."""

    def __init__(self, server, loras: list[bytes]) -> None:
        super().__init__(server, loras)
        self.edits: dict[int, dict] = {}
        self.hidden: set[int] = set()
        self.blobs["img1.png"] = png_bytes(200)
        server.expect_request("/cdn/img1.png").respond_with_handler(self.cdn)

    def version(self, i: int) -> dict:
        return {**super().version(i), **self.edits.get(i, {})}

    def models(self, request: Request) -> Response:
        self.api_calls.append(request)
        ids = [i for i in sorted(range(len(self.loras)), reverse=True) if i not in self.hidden]
        return Response(_json({"items": [self.model(i) for i in ids], "metadata": {}}),
                        content_type="application/json")


@pytest.fixture
def civitai(httpserver, loras):
    return EditableCivitai(httpserver, loras)


def _source(civitai) -> CivitaiSource:
    return CivitaiSource(civitai.server.url_for("/").rstrip("/"), page_size=10)


def _rows(reg: Registry) -> dict[str, dict]:
    return {r["name"]: r for r in reg.column_rows(reg.loras, ["name", "trigger_words", "description",
                                                               "render_prompts", "render_blobs"])}


def test_a_full_crawl_rewrites_the_card_of_a_version_edited_upstream(civitai, tmp_path):
    reg = Registry.open(tmp_path / "reg")
    first = sync(_source(civitai), reg, tmp_path / "dl")
    assert len(first.downloaded) == 3 and first.failed == []
    civitai.edits[1] = {"trainedWords": ["inkfox"], "description": "now in ink",
                        "images": [{"url": civitai.server.url_for("/cdn/img1.png"), "nsfwLevel": 1,
                                    "meta": {"prompt": "an ink fox, inkfox"}}]}
    lora_calls = len([c for c in civitai.cdn_calls if c.path.endswith(".safetensors")])
    again = sync(_source(civitai), reg, tmp_path / "dl", first.cursor)  # the cursor: nothing newer
    assert again.discovered == 0 and again.refreshed == []
    full = sync(_source(civitai), reg, tmp_path / "dl", again.cursor, from_start=True)
    assert full.refreshed == ["civitai:11@101"] and full.downloaded == [] and len(full.already_present) == 2
    assert len([c for c in civitai.cdn_calls if c.path.endswith(".safetensors")]) == lora_calls  # no re-download
    assert len(full.ingest.refreshed) == 1
    row = _rows(reg)["Watercolour 1"]
    assert row["trigger_words"] == ["inkfox"] and row["description"] == "now in ink"
    assert row["render_prompts"] == ["an ink fox, inkfox"] and row["render_blobs"][0]
    assert reg.search("inkfox", k=1, channel="text")[0].name == "Watercolour 1"
    unchanged = sync(_source(civitai), reg, tmp_path / "dl", full.cursor, from_start=True)
    assert unchanged.refreshed == [] and unchanged.ingest.refreshed == []


def test_releases_deleted_upstream_are_reported_by_a_complete_crawl_and_kept(civitai, tmp_path):
    reg = Registry.open(tmp_path / "reg")
    first = sync(_source(civitai), reg, tmp_path / "dl")
    assert first.gone_upstream == []
    civitai.hidden = {0}
    partial = sync(_source(civitai), reg, tmp_path / "dl", first.cursor)  # not a complete listing: no verdict
    assert partial.gone_upstream == []
    full = sync(_source(civitai), reg, tmp_path / "dl", partial.cursor, from_start=True)
    assert full.gone_upstream == ["civitai:10@100"] and full.failed == []
    assert len(reg) == 3 and len(list((tmp_path / "dl" / "civitai").iterdir())) == 3  # nothing deleted


LORA_TAGS = ["lora", FLUX_DEV_ADAPTERS]


def _card(trigger: str) -> str:
    return (f"---\nlicense: mit\nbase_model: black-forest-labs/FLUX.1-dev\ntags:\n- lora\ninstance_prompt: {trigger}\n"
            f"widget:\n- text: a lantern, {trigger}\n  output:\n    url: images/ex.png\n---\n# Lantern\n")


@pytest.fixture
def olah(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with running_olah(tmp_path / "olah", tags=LORA_TAGS) as server:
        yield server


def test_a_hub_commit_that_changes_the_trigger_replaces_the_old_one(olah, loras, tmp_path):
    files = {"one.safetensors": loras[0], "images/ex.png": png_bytes(30)}
    olah.add("orgB/single", files, _card("singletrig"), "2025-01-02T00:00:00")
    reg = Registry.open(tmp_path / "reg")
    source = HubSource(endpoint=olah.url)
    first = sync(source, reg, tmp_path / "dl")
    assert first.failed == [] and _rows(reg)["single"]["trigger_words"] == ["singletrig"]
    new_sha = olah.add("orgB/single", files, _card("newsingletrig"), "2025-02-01T00:00:00")
    second = sync(source, reg, tmp_path / "dl", first.cursor)
    assert second.downloaded == [f"hub:orgB/single@{new_sha}"] and len(second.refreshed) == 1
    row = _rows(reg)["single"]
    assert row["trigger_words"] == ["newsingletrig"]  # not the old one beside it
    assert row["render_prompts"] == ["a lantern, newsingletrig"]
    old = [json.loads(p.read_text()) for p in (tmp_path / "dl" / "hub").glob("*/one.json")]
    assert sorted(c["trigger_words"][0] for c in old) == ["newsingletrig", "newsingletrig"]
    assert [c["superseded_by"] for c in old if "superseded_by" in c] == [new_sha]


def test_a_hub_repo_whose_model_info_failed_is_retried_by_the_next_sync(olah, loras, tmp_path):
    olah.add("orgA/readable", {"a.safetensors": loras[0]}, _card("readtrig"), "2025-01-05T00:00:00")
    olah.listing.append({"id": "orgC/late", "sha": "0" * 40, "lastModified": "2025-01-03T00:00:00.000Z",
                         "tags": LORA_TAGS})  # listed, not readable yet
    olah.write_listing()
    reg = Registry.open(tmp_path / "reg")
    source = HubSource(endpoint=olah.url)
    first = sync(source, reg, tmp_path / "dl")
    assert [(f["key"], f["retry"]) for f in first.failed] == [(f"hub:orgC/late@{'0' * 40}", True)]
    assert "model info unreadable" in first.failed[0]["reason"]
    assert "orgC/late" not in first.cursor["source"]["at_since"] and "orgC/late" in first.cursor["source"]["retry"]
    sha = olah.add("orgC/late", {"c.safetensors": loras[1]}, _card("latetrig"), "2025-01-03T00:00:00")  # readable now
    second = sync(source, reg, tmp_path / "dl", first.cursor)
    assert second.downloaded == [f"hub:orgC/late@{sha}"] and second.failed == []
    assert second.cursor["source"]["retry"] == {} and len(reg) == 2
