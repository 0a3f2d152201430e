"""Metadata that stays current: the stat cache, sidecars added after ingest, files that vanish
(prune) and come back, and paths as users type them (``~``, ``$VARS``, links, empty folders)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from flux_fixtures import flux_lora, partial_names

import registry.ingest as ingest
from registry import Registry
from registry.embed import WeightEmbedder
from registry.lora.formats import save_lora


def _save(path: Path, seed: int, fmt: str = "diffusers") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_lora(path, flux_lora(partial_names((seed % 19,), (), attention_only=True), rank=2, seed=seed), fmt)
    return path


def _add_by_name(reg: Registry, folder: Path) -> dict[str, str]:
    """Ingest ``folder``; the ids of the LoRAs added, by file name."""
    return {Path(a["path"]).name: a["lora_id"] for a in reg.add([folder]).added}


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "loras"
    _save(root / "harbor_fog.safetensors", 1)
    _save(root / "sub" / "copper_leaf.safetensors", 2, "kohya")
    return root


def test_a_sidecar_added_after_ingest_reaches_the_row_and_search_in_one_version(folder, tmp_path):
    reg = Registry.open(tmp_path / "registry")
    first = reg.add([folder])
    assert len(first.added) == 2
    harbor = next(a["lora_id"] for a in first.added if a["path"].endswith("harbor_fog.safetensors"))
    assert reg.get(harbor)["name"] == "harbor_fog" and reg.get(harbor)["trigger_words"] == []
    before = reg.version

    (folder / "harbor_fog.civitai.info").write_text(json.dumps({
        "trainedWords": ["hrbrfg"], "baseModel": "Flux.1 D",
        "model": {"name": "Misty Harbour", "tags": ["lighthouse", "sea mist"]}}))
    again = reg.add([folder])
    assert [r["lora_id"] for r in again.refreshed] == [harbor]
    assert len(again.unchanged) == 1 and not again.added and not again.duplicates
    assert reg.version == before + 1  # all refreshed rows in one write
    row = reg.get(harbor)
    assert row["name"] == "Misty Harbour" and row["trigger_words"] == ["hrbrfg"]
    assert "lighthouse" in row["tags"]
    assert reg.search("lighthouse in sea mist", k=1)[0].lora_id == harbor
    assert reg.search("lighthouse", k=1, channel="text")[0].lora_id == harbor

    assert not reg.add([folder]).refreshed  # the new signature is remembered


def test_a_card_beside_a_duplicate_file_reaches_the_stored_row(folder, tmp_path):
    reg = Registry.open(tmp_path / "registry")
    reg.add([folder])
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "same_weights.safetensors").write_bytes((folder / "harbor_fog.safetensors").read_bytes())
    (other / "same_weights.json").write_text(json.dumps({"name": "Harbour Fog", "trigger_words": ["fogg"]}))
    report = reg.add([other])
    assert report.duplicates and report.duplicates[0]["kind"] == "sha256"
    row = reg.get(report.duplicates[0]["lora_id"])
    assert row["trigger_words"] == ["fogg"]
    assert sorted(Path(f["path"]).name for f in reg.paths_of(row["lora_id"])) == [
        "harbor_fog.safetensors", "same_weights.safetensors"]


def test_a_touched_file_is_hashed_once_and_a_replaced_one_reingested(folder, tmp_path, monkeypatch):
    reg = Registry.open(tmp_path / "registry")
    reg.add([folder])
    hashed = []
    real = ingest.sha256_file
    monkeypatch.setattr(ingest, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    target = folder / "harbor_fog.safetensors"
    os.utime(target, ns=(1, 1))  # same bytes, new mtime: the hash decides, nothing is added
    touched = reg.add([folder])
    assert hashed == ["harbor_fog.safetensors"] and len(touched.unchanged) == 2 and not touched.added
    hashed.clear()
    assert not reg.add([folder]).added and hashed == []  # the new mtime was recorded

    _save(target, 7)  # other weights at the same path
    replaced = reg.add([folder])
    assert len(replaced.added) == 1 and len(reg) == 3
    assert reg.rows(reg.files, f"path = '{os.path.realpath(target)}'", 5)[0]["lora_id"] == replaced.added[0]["lora_id"]


def test_prune_hides_loras_whose_every_path_is_gone_and_restores_them(folder, tmp_path):
    reg = Registry.open(tmp_path / "registry")
    added = _add_by_name(reg, folder)
    copper = added["copper_leaf.safetensors"]
    copy = tmp_path / "backup" / "copper_leaf.safetensors"
    copy.parent.mkdir()
    copy.write_bytes((folder / "sub" / "copper_leaf.safetensors").read_bytes())
    reg.add([copy])
    moved = tmp_path / "moved.safetensors"
    (folder / "sub" / "copper_leaf.safetensors").rename(moved)

    first = reg.prune()
    assert (first["paths_gone"], first["removed"]) == (1, 0)  # the backup copy still holds it
    copy.unlink()
    counts = reg.prune()
    assert (counts["paths_gone"], counts["removed"]) == (1, 1)
    assert reg.get(copper)["removed"] is True
    assert copper not in {h.lora_id for h in reg.search("copper_leaf", k=5)}
    assert copper in {h.lora_id for h in reg.search("copper_leaf", k=5, include_removed=True)}

    moved.rename(folder / "sub" / "copper_leaf.safetensors")  # back where it was
    back = reg.add([folder])
    assert [r["lora_id"] for r in back.refreshed] == [copper]
    assert reg.get(copper)["removed"] is False
    assert copper in {h.lora_id for h in reg.search("copper_leaf", k=5)}


def test_a_lora_overwritten_in_place_by_another_is_pruned_as_gone(folder, tmp_path):
    """v2 saved over v1: the path's record moves to v2, and v1, left with no path, is removed."""
    reg = Registry.open(tmp_path / "registry")
    added = _add_by_name(reg, folder)
    old = added["harbor_fog.safetensors"]
    _save(folder / "harbor_fog.safetensors", 41)
    new = reg.add([folder]).added[0]["lora_id"]
    assert reg.paths_of(old) == [] and reg.get(old)["removed"] is False
    counts = reg.prune()
    assert counts["removed"] == 1 and reg.get(old)["removed"] is True and reg.get(new)["removed"] is False
    assert old not in {h.lora_id for h in reg.search("harbor_fog", k=5)}
    assert reg.prune()["removed"] == 0  # marked once


def test_a_pruned_lora_found_at_a_new_path_is_unmarked_by_the_ingest(folder, tmp_path):
    reg = Registry.open(tmp_path / "registry")
    added = _add_by_name(reg, folder)
    copper = added["copper_leaf.safetensors"]
    elsewhere = tmp_path / "elsewhere" / "copper_leaf.safetensors"
    elsewhere.parent.mkdir()
    (folder / "sub" / "copper_leaf.safetensors").rename(elsewhere)
    assert reg.prune()["removed"] == 1
    report = reg.add([elsewhere.parent])
    assert [(d["lora_id"], d["kind"]) for d in report.duplicates] == [(copper, "sha256")]
    assert reg.get(copper)["removed"] is False
    assert copper in {h.lora_id for h in reg.search("copper_leaf", k=5)}


def test_user_paths_expand_and_bad_paths_are_reported(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("LORA_ROOT", str(home / "ComfyUI"))
    _save(home / "ComfyUI" / "models" / "loras" / "a.safetensors", 3)
    (home / "empty").mkdir()
    loop = home / "ComfyUI" / "models" / "loras" / "loop.safetensors"
    loop.symlink_to(loop)
    reg = Registry.open("~/registry")
    assert reg.root == home / "registry"
    report = reg.add(["$LORA_ROOT/models/loras", "~/empty"])
    assert len(report.added) == 1
    assert [(Path(r["path"]).name, r["code"]) for r in report.rejected] == [("loop.safetensors", "broken_link")]
    assert any("no LoRA files found under" in w and "empty" in w for w in report.warnings)
    version = reg.version
    with pytest.raises(FileNotFoundError, match="nothere"):
        reg.add(["~/nothere", "~/empty"])
    assert reg.version == version


def test_an_unreadable_subfolder_is_reported(folder, tmp_path, monkeypatch):
    """(Permissions do not bind root, who runs CI: the walk is made to fail as it would.)"""
    blocked = folder / "sub"
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path) == str(blocked):
            raise PermissionError(13, "Permission denied", str(blocked))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    reg = Registry.open(tmp_path / "registry")
    report = reg.add([folder])
    assert len(report.added) == 1
    assert [(r["path"], r["code"]) for r in report.rejected] == [(str(blocked), "unreadable")]


def test_a_failure_while_the_blob_is_copied_leaves_no_staged_file(folder, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("encoder file unreadable")

    monkeypatch.setattr(WeightEmbedder, "embed", broken)
    reg = Registry.open(tmp_path / "registry")
    report = reg.add([folder])  # each file's failure is its recorded rejection; the run ends
    assert report.rejected and all(r["code"] == "internal_error" and "encoder file unreadable" in r["reason"]
                                   for r in report.rejected)
    assert not list(reg.blobs.root.rglob(".incoming-*")) and reg.lora_ids() == []


def test_one_path_need_not_be_in_a_list(folder, tmp_path):
    reg = Registry.open(tmp_path / "registry")
    assert [Path(a["path"]).name for a in reg.add(str(folder / "harbor_fog.safetensors")).added] == [
        "harbor_fog.safetensors"]
    assert [Path(a["path"]).name for a in reg.add(folder / "sub").added] == ["copper_leaf.safetensors"]
    with pytest.raises(FileNotFoundError, match=r"no such file or folder: \S+/bad/evil\.pt$"):
        reg.add(str(tmp_path / "bad" / "evil.pt"))


def test_broken_sidecars_are_warned_about_and_kept_out_of_the_row(folder, tmp_path):
    """A card that is no JSON, or a Civitai info of another shape, does not stop its LoRA: it is
    ingested without it, and the report names the file and why; a card broken later likewise."""
    card, info = folder / "harbor_fog.json", folder / "sub" / "copper_leaf.civitai.info"
    card.write_text("{not json")
    info.write_text(json.dumps({"trainedWords": ["junk"], "images": [{"meta": "not a dict"}]}))
    reg = Registry.open(tmp_path / "registry")
    report = reg.add(folder)
    assert len(report.added) == 2 and not report.rejected
    assert [w.split(": ", 1)[0] for w in report.warnings] == [f"ignored sidecar {card}", f"ignored sidecar {info}"]
    assert "invalid JSON" in report.warnings[0] and "unexpected content" in report.warnings[1]
    ids = {Path(a["path"]).stem: a["lora_id"] for a in report.added}
    for stem, lora_id in ids.items():  # named by their stems, nothing of the broken files kept
        assert (reg.get(lora_id)["name"], reg.get(lora_id)["trigger_words"]) == (stem, [])

    (folder / "sub" / "copper_leaf.json").write_text(json.dumps(["a list"]))  # a new sidecar: the row is rebuilt
    again = reg.add(folder)
    assert [r["lora_id"] for r in again.refreshed] == [ids["copper_leaf"]]
    assert f"ignored sidecar {folder / 'sub' / 'copper_leaf.json'}: not a JSON object" in again.warnings
    assert reg.get(ids["copper_leaf"])["trigger_words"] == []


def test_a_cards_name_wins_over_the_headers_output_name_which_stays_searchable(tmp_path):
    folder = tmp_path / "loras"
    layers = flux_lora(partial_names((5,), (), attention_only=True), rank=2, seed=42)
    folder.mkdir()
    save_lora(folder / "mh.safetensors", layers, "kohya", metadata={"ss_output_name": "mhv3_final_e10"})
    save_lora(folder / "fog.safetensors", flux_lora(partial_names((6,), (), attention_only=True), rank=2, seed=43),
              "kohya", metadata={"ss_output_name": "sea-fog"})
    (folder / "mh.json").write_text(json.dumps({"name": "Misty Harbour"}))
    (folder / "fog.json").write_text(json.dumps({"name": "Sea Fog"}))  # the same name, spelled otherwise
    reg = Registry.open(tmp_path / "registry")
    ids = _add_by_name(reg, folder)
    harbour, fog = reg.get(ids["mh.safetensors"]), reg.get(ids["fog.safetensors"])
    assert harbour["name"] == "Misty Harbour" and "mhv3_final_e10" in harbour["search_text"].splitlines()
    assert fog["name"] == "sea-fog" and "Sea Fog" not in fog["search_text"]
    assert reg.search("mhv3_final_e10", k=1, channel="text")[0].lora_id == ids["mh.safetensors"]
    (folder / "mh.json").write_text(json.dumps({"name": "Misty Harbour", "trigger_words": ["hrbr"]}))
    reg.add([folder])  # the row rebuilt from its sidecars names it the same way
    assert reg.get(ids["mh.safetensors"])["name"] == "Misty Harbour"
    assert reg.get(ids["mh.safetensors"])["trigger_words"] == ["hrbr"]
