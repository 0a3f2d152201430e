"""sources.toml paths with ``$VARS``, an empty sources file, Ctrl-C during ``autolora sync``, and
enrichment of a local source's bare files through a Civitai entry (``enrich = "NAME"``), against a
server on 127.0.0.1 in Civitai's by-hash wire format."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from source_fixtures import png_bytes, sha256

from pipelines.cli import main
from pipelines.sources.config import load_sources
from registry import Registry

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "registry"))
from flux_fixtures import flux_lora, partial_names  # noqa: E402

from registry.lora.formats import save_lora  # noqa: E402


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    monkeypatch.setattr("pipelines.cli_sources.OFFLINE_BY_USER", True)  # leave HF_HUB_OFFLINE alone


def test_vars_expand_in_a_local_folder_and_an_unset_one_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_HOME", str(tmp_path / "mine"))
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    (tmp_path / "s.toml").write_text('[[source]]\nkind = "local"\nfolder = "$LORA_HOME/loras"\n'
                                     '[[source]]\nkind = "local"\nname = "b"\nfolder = "${LORA_HOME}/b"\n')
    first, second = load_sources(tmp_path / "s.toml")
    assert first.folder == tmp_path / "mine" / "loras" and second.folder == tmp_path / "mine" / "b"
    (tmp_path / "s.toml").write_text('[[source]]\nkind = "local"\nfolder = "$NOPE_NOT_SET/loras"\n')
    with pytest.raises(ValueError, match=r"s\.toml: \[\[source\]\] #1: folder: \$NOPE_NOT_SET is not set"):
        load_sources(tmp_path / "s.toml")


@pytest.mark.parametrize("text, message", [
    ("# nothing yet\n", "has no sources: add a [[source]] table"),
    ('[[source]]\nkind = "local"\nname = "off"\nenabled = false\n', "has no enabled source (disabled: off)"),
])
def test_a_sources_file_with_nothing_to_sync_is_a_usage_error(tmp_path, capsys, text, message):
    (tmp_path / "s.toml").write_text(text)
    code = main(["sync", "--registry", str(tmp_path / "reg"), "--sources", str(tmp_path / "s.toml")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("autolora sync: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "reg").exists()


def test_ctrl_c_during_sync_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    (tmp_path / "loras").mkdir()
    (tmp_path / "s.toml").write_text('[[source]]\nkind = "local"\nfolder = "loras"\n')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipelines.sources.sync.sync", interrupted)
    code = main(["sync", "--registry", str(tmp_path / "reg"), "--sources", str(tmp_path / "s.toml")])
    err = capsys.readouterr().err
    assert code == 130 and err.startswith("autolora sync: interrupted") and len(err.splitlines()) == 1


def test_a_local_source_with_enrich_gets_cards_from_civitai_by_hash(httpserver, tmp_path, capsys):
    folder = tmp_path / "loras"
    folder.mkdir()
    save_lora(folder / "mystery.safetensors", flux_lora(partial_names((4,), ()), rank=2, seed=4), "kohya")
    save_lora(folder / "unknown.safetensors", flux_lora(partial_names((5,), ()), rank=2, seed=5), "kohya")
    digest = sha256((folder / "mystery.safetensors").read_bytes())
    httpserver.expect_request(f"/api/v1/model-versions/by-hash/{digest}").respond_with_json({
        "id": 555, "modelId": 55, "name": "v2", "baseModel": "Flux.1 D", "trainedWords": ["inkwash"],
        "description": "ink wash painting", "model": {"name": "Ink Wash", "type": "LORA", "nsfw": False},
        "files": [{"name": "ink.safetensors", "type": "Model", "hashes": {"SHA256": digest.upper()},
                   "downloadUrl": httpserver.url_for("/api/download/models/555")}],
        "images": [{"url": httpserver.url_for("/img/1.png"), "nsfwLevel": 1, "meta": {"prompt": "ink wash crane"}}]})
    httpserver.expect_request("/img/1.png").respond_with_data(png_bytes(), content_type="image/png")
    httpserver.expect_request(re.compile(r"/api/v1/model-versions/by-hash/.*")).respond_with_json(
        {"error": "Model not found"}, status=404)  # any other hash
    url = httpserver.url_for("/").rstrip("/")
    (tmp_path / "s.toml").write_text('[[source]]\nkind = "local"\nname = "mine"\nfolder = "loras"\nenrich = "civ"\n'
                                     '[[source]]\nkind = "civitai"\nname = "civ"\nenabled = false\n'
                                     f'base_url = "{url}"\n')
    common = ["sync", "--registry", str(tmp_path / "reg"), "--sources", str(tmp_path / "s.toml"), "--json"]
    assert main(common) == 0
    report = json.loads(capsys.readouterr().out)["mine"]
    assert report["enriched"] == [str(folder / "mystery.json")] and len(report["ingest"]["added"]) == 2
    reg = Registry.open(tmp_path / "reg", create=False)
    row = next(r for r in reg.column_rows(reg.loras, ["name", "trigger_words", "render_prompts"])
               if r["name"] == "Ink Wash")
    assert row["trigger_words"] == ["inkwash"] and row["render_prompts"] == ["ink wash crane"]
    assert main(common) == 0  # the card written counts as seen: nothing new, nothing asked again
    again = json.loads(capsys.readouterr().out)["mine"]
    assert again["discovered"] == 0 and again["enriched"] == []


def test_enrich_must_name_a_civitai_source(tmp_path):
    (tmp_path / "s.toml").write_text('[[source]]\nkind = "local"\nenrich = "civ"\n')
    with pytest.raises(ValueError, match=r"enrich must name a civitai source of this file \(it has \[\]\)"):
        load_sources(tmp_path / "s.toml")
