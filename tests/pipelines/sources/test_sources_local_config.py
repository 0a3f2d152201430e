"""Local-folder discovery (the cursor), the sources TOML, and Civitai enrichment by hash."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from source_fixtures import png_bytes, sha256
from werkzeug import Response

from pipelines.sources.civitai import CivitaiSource
from pipelines.sources.civitai_enrich import enrich_by_hash
from pipelines.sources.config import load_sources
from pipelines.sources.hub import HubSource
from pipelines.sources.base import SourceError
from pipelines.sources.local import DEMO_LORAS, LocalSource, changed_files
from pipelines.sources.sync import sync
from registry import Registry

ROOT = Path(__file__).resolve().parents[3]


def test_local_cursor_finds_only_new_or_changed_files_and_sidecars(tmp_path, loras):
    folder = tmp_path / "loras"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.safetensors").write_bytes(loras[0])
    (folder / "sub" / "b.safetensors").write_bytes(loras[1])
    (folder / "notes.txt").write_text("not a LoRA")
    paths, cursor = changed_files(folder, None)
    assert paths == [str(folder / "a.safetensors"), str(folder / "sub" / "b.safetensors")]
    assert changed_files(folder, cursor)[0] == []
    (folder / "sub" / "b.json").write_text(json.dumps({"trigger_words": ["bee"]}))  # a new card
    (folder / "c.safetensors").write_bytes(loras[2])
    os.utime(folder / "a.safetensors", ns=(1, 1))  # rewritten (mtime changed)
    paths, cursor = changed_files(folder, cursor)
    assert paths == sorted(str(folder / n) for n in ("a.safetensors", "c.safetensors", "sub/b.safetensors"))
    (folder / "c.safetensors").unlink()
    paths, cursor = changed_files(folder, cursor)
    assert paths == [] and str(folder / "c.safetensors") not in json.loads(cursor)["files"]


def test_local_sync_ingests_in_place(tmp_path, loras):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(loras[0])
    (folder / "a.json").write_text(json.dumps({"name": "Alpha", "trigger_words": ["alf"]}))
    reg = Registry.open(tmp_path / "reg")
    report = sync(LocalSource(folder), reg, tmp_path / "unused")
    assert len(report.ingest.added) == 1 and reg.column_rows(reg.loras, ["name"]) == [{"name": "Alpha"}]
    assert not (tmp_path / "unused").exists()
    assert sync(LocalSource(folder), reg, tmp_path / "unused", report.cursor).discovered == 0


def test_shipped_sources_toml_has_local_enabled_and_crawls_ready(tmp_path):
    enabled = load_sources(ROOT / "sources.toml")
    assert [type(s).__name__ for s in enabled] == ["LocalSource"]
    # the demo world's zoo: pipelines.world.build writes OUT/SIZE-seedN/loras, bin/demo's OUT is .autolora/world
    assert DEMO_LORAS == str(Path(".autolora/world") / "default-seed0" / "loras")
    assert enabled[0].folder == ROOT / DEMO_LORAS
    every = load_sources(ROOT / "sources.toml", include_disabled=True)
    assert [s.name for s in every] == ["local", "hub", "civitai"]
    assert isinstance(every[1], HubSource) and every[1].filter == "base_model:adapter:black-forest-labs/FLUX.1-dev"
    assert isinstance(every[2], CivitaiSource) and every[2].base_models == ("Flux.1 D",)


@pytest.mark.parametrize("text, message", [
    ('[[source]]\nkind = "ftp"\n', "kind must be one of"),
    ('[[source]]\nkind = "hub"\ntoken = "hf_x"\n', "environment"),
    ('[[source]]\nkind = "hub"\nfolder = "x"\n', "unknown option"),
    ('[[source]]\nkind = "local"\n[[source]]\nkind = "local"\n', "duplicate source name"),
])
def test_bad_sources_toml_is_refused_with_a_reason(tmp_path, text, message):
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_sources(tmp_path / "s.toml")


@pytest.mark.parametrize("text, message", [
    ('[[source]\nkind = "local"\n', r"s\.toml: not valid TOML: Expected"),
    ('[source]\nkind = "local"\n', r"s\.toml: 'source' must be an array of tables: write \[\[source\]\]"),
    ('source = [1]\n', r"s\.toml: \[\[source\]\] #1: expected a table"),
    ('[[sources]]\nkind = "local"\n', r"s\.toml: unknown top-level key\(s\) \['sources'\]"),
    ('[[source]]\nkind = "local"\nfolder = 3\n', r"s\.toml: \[\[source\]\] #1: folder must be a string, not 3"),
    ('[[source]]\nkind = "local"\nenabled = "no"\n', "enabled must be true or false, not 'no'"),
    ('[[source]]\nkind = "civitai"\nbase_models = "Flux.1 D"\n', "base_models must be a list of strings"),
    ('[[source]]\nkind = "civitai"\ntypes = ["LORA", 3]\n', "types must be a list of strings"),
    ('[[source]]\nkind = "civitai"\nname = "c"\npage_size = "lots"\n',
     r"#1 \('c'\): page_size must be an integer from 1 to 100, not 'lots'"),
    ('[[source]]\nkind = "civitai"\npage_size = 101\n', r"page_size must be an integer from 1 to 100, not 101"),
    ('[[source]]\nkind = "civitai"\nmax_pages = -3\n', "max_pages must be a positive integer, not -3"),
    ('[[source]]\nkind = "civitai"\nmax_pages = true\n', "max_pages must be a positive integer, not True"),
    ('[[source]]\nkind = "hub"\nmax_file_bytes = "2GB"\n', "max_file_bytes must be a positive integer"),
    ('[[source]]\nkind = "hub"\nendpoint = "127.0.0.1:8080"\n', "endpoint must be an http:// or https:// URL"),
    ('[[source]]\nkind = "civitai"\nbase_url = "civitai.com"\n', "base_url must be an http:// or https:// URL"),
    ('[[source]]\nkind = "hub"\npage_size = 100\n', r"unknown option\(s\) \['page_size'\] for kind 'hub'"),
    ('[[source]]\nkind = "local"\nname = 5\n', "name must be a string"),
])
def test_every_sources_toml_mistake_is_one_value_error_naming_the_file(tmp_path, text, message):
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        load_sources(tmp_path / "s.toml", include_disabled=True)
    assert type(error.value) is ValueError and str(error.value).startswith(str(tmp_path / "s.toml"))


@pytest.mark.parametrize("make", [lambda p: None, lambda p: p.mkdir()], ids=["missing", "a folder"])
def test_an_unreadable_sources_file_is_one_value_error_naming_it(tmp_path, make):
    make(tmp_path / "s.toml")
    with pytest.raises(ValueError, match="cannot read the sources file") as error:
        load_sources(tmp_path / "s.toml")
    assert type(error.value) is ValueError and str(error.value).startswith(str(tmp_path / "s.toml"))


def test_sources_toml_values_reach_the_sources_typed(tmp_path):
    (tmp_path / "s.toml").write_text('[[source]]\nkind = "civitai"\nbase_models = ["Flux.1 D", "Flux.1 S"]\n'
                                     'page_size = 7\nmax_pages = 2\nenabled = false\n'
                                     '[[source]]\nkind = "local"\n')
    civitai, local = load_sources(tmp_path / "s.toml", include_disabled=True)
    assert civitai.base_models == ("Flux.1 D", "Flux.1 S") and (civitai.page_size, civitai.max_pages) == (7, 2)
    assert local.folder == tmp_path / DEMO_LORAS  # the default: the demo world's LoRAs beside the file
    assert [s.name for s in load_sources(tmp_path / "s.toml")] == ["local"]


def test_a_relative_sources_toml_path_gives_a_working_local_source(tmp_path, loras, monkeypatch):
    """``dagster dev`` reads ``sources.toml`` relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.safetensors").write_bytes(loras[0])
    Path("s.toml").write_text('[[source]]\nkind = "local"\nfolder = "mine"\n')
    (source,) = load_sources("s.toml")
    found, _ = source.discover(None)
    assert source.folder == tmp_path / "mine" and [c.files[0].url for c in found] == [
        (tmp_path / "mine" / "a.safetensors").as_uri()]


def test_a_missing_local_folder_is_reported_not_an_empty_listing(tmp_path, loras):
    source = LocalSource(tmp_path / "nope")
    with pytest.raises(SourceError, match="nope does not exist") as error:
        source.discover(None)
    assert error.value.code == "missing"
    report = sync(source, Registry.open(tmp_path / "reg"), tmp_path / "unused", {"source": {"files": {"x": "1"}}})
    assert [(f["code"], f["retry"]) for f in report.failed] == [("missing", True)]
    assert report.cursor["source"] == {"files": {"x": "1"}}  # kept: an unmounted folder is not "all deleted"


def test_enrich_a_bare_local_file_by_hash(httpserver, tmp_path, loras):
    """Civitai's by-hash answer, shaped from the public API docs (a model version with
    ``model``, ``trainedWords``, ``images[].meta.prompt``)."""
    digest = sha256(loras[0])
    httpserver.expect_request(f"/api/v1/model-versions/by-hash/{digest}").respond_with_json({
        "id": 555, "modelId": 55, "name": "v2", "baseModel": "Flux.1 D", "trainedWords": ["inkwash"],
        "model": {"name": "Ink Wash", "type": "LORA", "nsfw": False},
        "files": [{"name": "ink.safetensors", "type": "Model", "hashes": {"SHA256": digest.upper()},
                   "downloadUrl": httpserver.url_for("/api/download/models/555")}],
        "images": [{"url": httpserver.url_for("/img/1.png"), "nsfwLevel": 1, "meta": {"prompt": "ink wash crane"}}]})
    httpserver.expect_request("/img/1.png").respond_with_data(png_bytes(), content_type="image/png")
    httpserver.expect_request(f"/api/v1/model-versions/by-hash/{'0' * 64}").respond_with_response(
        Response('{"error":"Model not found"}', status=404))
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "mystery.safetensors").write_bytes(loras[0])
    (folder / "unknown.safetensors").write_bytes(loras[1])
    civitai = CivitaiSource(httpserver.url_for("/").rstrip("/"))
    card = enrich_by_hash(folder / "mystery.safetensors", civitai)
    assert card == folder / "mystery.json" and (folder / "mystery.preview-0.png").is_file()
    assert enrich_by_hash(folder / "unknown.safetensors", civitai, sha256="0" * 64) is None
    assert enrich_by_hash(folder / "mystery.safetensors", civitai) is None  # a card exists: kept
    assert sorted(p.name for p in folder.iterdir()) == [
        "mystery.json", "mystery.preview-0.png", "mystery.safetensors", "unknown.safetensors"]
    reg = Registry.open(tmp_path / "reg")
    reg.add([folder])
    row = next(r for r in reg.column_rows(reg.loras, ["name", "trigger_words", "render_prompts"])
               if r["name"] == "Ink Wash")
    assert row["trigger_words"] == ["inkwash"] and row["render_prompts"] == ["ink wash crane"]
