"""``Registry.set_captions``: one write for all rows, captions paired with renders, the search
document and its vector rebuilt, everything else kept; bad input raises and writes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flux_fixtures import flux_lora, partial_names
from PIL import Image

from registry import Registry
from registry.captions import SELF_RENDERED, search_document
from registry.lora.formats import save_lora
from registry.store.schema import loras_schema


@pytest.fixture
def reg(tmp_path) -> Registry:
    folder = tmp_path / "loras"
    folder.mkdir()
    save_lora(folder / "ember.safetensors", flux_lora(partial_names((0,), (1,), attention_only=True), seed=1),
              "diffusers")
    save_lora(folder / "plain.safetensors", flux_lora(partial_names((2,), (), attention_only=True), seed=2),
              "diffusers")
    (folder / "ember.json").write_text(json.dumps({
        "name": "Ember Glow", "trigger_words": ["emb3r"],
        "renders": [{"image": "ember.a.png", "prompt": "emb3r, a campfire"},
                    {"image": "ember.b.png", "prompt": "emb3r, a candle"}]}))
    Image.new("RGB", (8, 8), (200, 80, 10)).save(folder / "ember.a.png")
    Image.new("RGB", (8, 8), (250, 120, 10)).save(folder / "ember.b.png")
    registry = Registry.open(tmp_path / "registry")
    assert len(registry.add([folder]).added) == 2
    return registry


def _ids(reg: Registry) -> tuple[str, str]:
    rows = {r["name"]: r["lora_id"] for r in reg.column_rows(reg.loras, ["lora_id", "name"])}
    return rows["Ember Glow"], rows["plain"]


def _vector(reg: Registry, lora_id: str) -> np.ndarray:
    return np.asarray(reg.rows(reg.loras, f"lora_id = '{lora_id}'", 1, ["text_vector"])[0]["text_vector"])


def _full_text(reg: Registry, word: str) -> list[str]:
    """Ids whose search document has ``word`` (LanceDB's full-text index alone)."""
    return [r["lora_id"] for r in reg.loras.search(word, query_type="fts").select(["lora_id"]).to_list()]


def test_one_write_captions_searchable_rest_kept(reg):
    ember, plain = _ids(reg)
    before, old_vector = reg.get(ember), _vector(reg, ember)
    assert before["captions"] == [] and before["caption_model"] is None
    assert not _full_text(reg, "xylophone")  # no document has the word yet
    version = reg.version
    n = reg.set_captions({ember: (["an orange glow over coals", "a xylophone made of flames"], "qwen-test"),
                          plain: ([], "qwen-test")})
    assert n == 2 and reg.version == version + 1  # one table version for both rows
    after = reg.get(ember)
    assert after["captions"] == ["an orange glow over coals", "a xylophone made of flames"]
    assert after["caption_model"] == "qwen-test" and reg.get(plain)["caption_model"] == "qwen-test"
    assert after["search_text"].startswith(before["search_text"]) and "xylophone" in after["search_text"]
    for column in ("name", "blob", "added_at", "render_prompts", "render_blobs", "trigger_words", "fingerprint"):
        assert after[column] == before[column], column
    assert not np.allclose(_vector(reg, ember), old_vector)  # re-embedded
    assert _full_text(reg, "xylophone") == [ember]
    assert reg.search("xylophone", k=2, channel="text")[0].lora_id == ember  # full text + vector, fused
    # a second write replaces the captions: the old word leaves the document
    reg.set_captions({ember: (["coals", "coals"], "qwen-test")})
    assert "xylophone" not in reg.get(ember)["search_text"]
    assert reg.get(ember)["search_text"].count("coals") == 1  # distinct captions only


def test_self_rendered_renders_replace_lists_and_stay_out_of_the_document(reg, tmp_path):
    _, plain = _ids(reg)
    image = tmp_path / "render.png"
    Image.new("RGB", (8, 8), (0, 0, 255)).save(image)
    blob = reg.blobs.put(image, "ab" * 32, ".png").relative_to(reg.root).as_posix()
    prompt = SELF_RENDERED + "a picture"
    reg.set_captions({plain: (["a blue tile"], "m")}, renders={plain: ([prompt], [blob])})
    row = reg.get(plain)
    assert row["render_prompts"] == [prompt] and row["render_blobs"] == [blob]
    assert "a blue tile" in row["search_text"] and "picture" not in row["search_text"]
    assert search_document(row, row["captions"]) == row["search_text"]


@pytest.mark.parametrize("updates, renders, error", [
    ({"lora-nope": (["x"], "m")}, None, KeyError),
    ("EMBER", None, ValueError),  # one caption for two renders
    ("EMBER_BAD_MODEL", None, ValueError),
    ("EMBER_NOT_STR", None, TypeError),
    ("PLAIN_MISSING_BLOB", "PLAIN", FileNotFoundError),
])
def test_bad_input_raises_and_writes_nothing(reg, updates, renders, error):
    ember, plain = _ids(reg)
    cases = {"EMBER": {ember: (["only one"], "m")}, "EMBER_BAD_MODEL": {ember: (["a", "b"], " ")},
             "EMBER_NOT_STR": {ember: (["a", 3], "m")}, "PLAIN_MISSING_BLOB": {plain: (["a"], "m")}}
    updates = cases.get(updates, updates) if isinstance(updates, str) else updates
    renders = {plain: (["p"], ["blobs/00/missing.png"])} if renders == "PLAIN" else renders
    version = reg.version
    with pytest.raises(error):
        reg.set_captions(updates, renders)
    assert reg.version == version and reg.get(ember)["captions"] == []


def test_an_older_registry_gains_the_column_when_opened(tmp_path):
    reg = Registry.open(tmp_path / "r")
    reg.loras.drop_columns(["caption_model"])
    assert "caption_model" not in reg.loras.schema.names
    again = Registry.open(tmp_path / "r")
    assert again.loras.schema.names == loras_schema().names
    pinned = Registry.open(tmp_path / "r", version=again.version)
    with pytest.raises(PermissionError):
        pinned.set_captions({"x": ([], "m")})



def test_a_row_whose_renders_changed_while_captioning_is_not_undone(reg, tmp_path):
    """The caption pass plans from the row, an ingest refreshes it with a new preview meanwhile,
    then the pass writes: the new render must stay (the write used to put the planned list back)."""
    ember, _ = _ids(reg)
    planned = reg.get(ember)
    seen = {ember: (planned["render_prompts"], planned["render_blobs"])}
    Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "loras" / "ember.c.png")
    assert reg.add([tmp_path / "loras"]).refreshed  # the new preview arrives
    refreshed = reg.get(ember)
    assert len(refreshed["render_blobs"]) == 3
    n = reg.set_captions({ember: (["glow", "candle"], "qwen-test")}, renders={ember: seen[ember]}, seen=seen)
    assert n == 0 and reg.get(ember)["render_blobs"] == refreshed["render_blobs"]
    assert reg.get(ember)["caption_model"] is None  # left for the next pass
    unchanged = {ember: (refreshed["render_prompts"], refreshed["render_blobs"])}
    assert reg.set_captions({ember: (["glow", "candle", "leaf"], "qwen-test")}, seen=unchanged) == 1
