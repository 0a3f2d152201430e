"""A row rebuilt from its sidecars keeps its renders and captions paired: each kept render keeps
its own caption, duplicates of a render are stored once, self-rendered renders survive a card
that brings no image, and the duplicates of one LoRA give it the same card data whether they come
in one ingest run or in several (and a removed duplicate takes its card data with it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from flux_fixtures import flux_lora, partial_names
from PIL import Image

import registry.ingest as ingest
from registry import Registry
from registry.captions import SELF_RENDERED
from registry.lora.formats import save_lora

MODEL = "qwen-test"


def _needs_captions(row: dict, model: str) -> bool:
    """What ``pipelines.caption_registry`` checks (copied: the registry may not import pipelines)."""
    return row["caption_model"] != model or len(row["captions"] or []) != len(row["render_blobs"] or [])


def _save(path: Path, seed: int, fmt: str = "diffusers") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_lora(path, flux_lora(partial_names((seed % 19,), (), attention_only=True), rank=2, seed=seed), fmt)
    return path


def _png(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _card(path: Path, **fields) -> None:
    path.write_text(json.dumps(fields))


def _only_id(reg: Registry) -> str:
    (lora_id,) = reg.lora_ids()
    return lora_id


# ---- 1. captions stay with their renders -------------------------------------------------------

RENDERS = {"a": ((200, 0, 0), "emb3r, a campfire"), "b": ((0, 200, 0), "emb3r, a candle"),
           "c": ((0, 0, 200), "emb3r, a torch")}
CAPTIONS = {"a": "a zebra by the fire", "b": "a yak with a candle", "c": "a quokka with a torch"}


@pytest.fixture
def ember(tmp_path):
    """A LoRA with three card renders, captioned by MODEL: (registry, id, folder, blob per render)."""
    folder = tmp_path / "loras"
    _save(folder / "ember.safetensors", 1)
    for key, (colour, _) in RENDERS.items():
        _png(folder / f"ember.{key}.png", colour)
    _card(folder / "ember.json", name="Ember", trigger_words=["emb3r"],
          renders=[{"image": f"ember.{k}.png", "prompt": p} for k, (_, p) in RENDERS.items()])
    reg = Registry.open(tmp_path / "registry")
    reg.add(folder)
    lora_id = _only_id(reg)
    blobs = reg.get(lora_id)["render_blobs"]
    assert len(set(blobs)) == 3 and all(blobs)
    reg.set_captions({lora_id: ([CAPTIONS[k] for k in RENDERS], MODEL)})
    return reg, lora_id, folder, dict(zip(RENDERS, blobs))


def _pairs(row: dict) -> list[tuple[str, str]]:
    assert len(row["captions"]) == len(row["render_blobs"]) == len(row["render_prompts"])
    return list(zip(row["render_blobs"], row["captions"]))


def test_a_render_dropped_from_the_card_takes_its_caption_with_it(ember):
    reg, lora_id, folder, blob = ember
    _card(folder / "ember.json", name="Ember", trigger_words=["emb3r"],
          renders=[{"image": f"ember.{k}.png", "prompt": RENDERS[k][1]} for k in ("b", "c")])
    report = reg.add(folder)
    assert [r["lora_id"] for r in report.refreshed] == [lora_id]
    row = reg.get(lora_id)
    # ember.a.png still lies beside the file: it is kept as a preview, with its own caption
    assert _pairs(row) == [(blob["b"], CAPTIONS["b"]), (blob["c"], CAPTIONS["c"]), (blob["a"], CAPTIONS["a"])]
    assert row["caption_model"] == MODEL and not _needs_captions(row, MODEL)

    (folder / "ember.a.png").unlink()  # now it is gone for good
    reg.add(folder)
    row = reg.get(lora_id)
    assert _pairs(row) == [(blob["b"], CAPTIONS["b"]), (blob["c"], CAPTIONS["c"])]
    assert row["render_prompts"] == [RENDERS["b"][1], RENDERS["c"][1]]
    assert row["caption_model"] == MODEL and not _needs_captions(row, MODEL)
    assert "zebra" not in row["search_text"] and "quokka" in row["search_text"]


def test_a_new_render_without_a_caption_makes_the_row_need_captions_again(ember):
    reg, lora_id, folder, blob = ember
    _png(folder / "ember.d.png", (9, 9, 9))
    reg.add(folder)
    row = reg.get(lora_id)
    assert _pairs(row)[:3] == [(blob[k], CAPTIONS[k]) for k in RENDERS]
    assert len(row["render_blobs"]) == 4 and row["captions"][3] == ""
    assert _needs_captions(row, MODEL)
    assert all(CAPTIONS[k] in row["search_text"] for k in RENDERS)  # what is known stays searchable


def test_a_byte_identical_copy_adds_no_render_twice(ember, tmp_path):
    reg, lora_id, folder, blob = ember
    before = reg.get(lora_id)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    report = reg.add(copy)
    assert report.duplicates and report.duplicates[0]["kind"] == "sha256"
    row = reg.get(lora_id)
    assert _pairs(row) == [(blob[k], CAPTIONS[k]) for k in RENDERS]
    assert row["render_prompts"] == before["render_prompts"]
    assert row["caption_model"] == MODEL and not _needs_captions(row, MODEL)
    assert row["search_text"] == before["search_text"]


def test_a_new_lora_stores_a_render_twice_only_once(tmp_path):
    folder = tmp_path / "loras"
    _save(folder / "twin.safetensors", 3)
    _png(folder / "twin.a.png", (1, 2, 3))
    _png(folder / "twin.b.png", (1, 2, 3))  # the same bytes under another name
    reg = Registry.open(tmp_path / "registry")
    reg.add(folder)
    row = reg.get(_only_id(reg))
    assert len(row["render_blobs"]) == len(row["render_prompts"]) == 1


# ---- 2. self-rendered renders ----------------------------------------------------------------

@pytest.fixture
def plain(tmp_path):
    """A LoRA that came without renders and was self-rendered and captioned (as the caption pass does)."""
    folder = tmp_path / "loras"
    _save(folder / "plain.safetensors", 2)
    reg = Registry.open(tmp_path / "registry")
    reg.add(folder)
    lora_id = _only_id(reg)
    image = _png(tmp_path / "render.png", (0, 0, 255))
    blob = reg.blobs.put(image, "ab" * 32, ".png").relative_to(reg.root).as_posix()
    reg.set_captions({lora_id: (["a blue tile"], MODEL)}, renders={lora_id: ([SELF_RENDERED + "an image"], [blob])})
    return reg, lora_id, folder, blob


def test_self_rendered_renders_stay_when_the_card_brings_no_image(plain):
    reg, lora_id, folder, blob = plain
    _card(folder / "plain.json", name="Plain Tiles", trigger_words=["pl41n"])
    assert reg.add(folder).refreshed
    row = reg.get(lora_id)
    assert row["name"] == "Plain Tiles" and row["trigger_words"] == ["pl41n"]
    assert row["render_prompts"] == [SELF_RENDERED + "an image"]
    assert _pairs(row) == [(blob, "a blue tile")]
    assert not _needs_captions(row, MODEL)
    assert "a blue tile" in row["search_text"] and "an image" not in row["search_text"]

    # a Civitai info whose images are links only: still no image of its own
    (folder / "plain.civitai.info").write_text(json.dumps(
        {"images": [{"url": "https://example.invalid/1.png", "meta": {"prompt": "pl41n, tiles"}}]}))
    reg.add(folder)
    row = reg.get(lora_id)
    assert row["render_prompts"] == ["pl41n, tiles", SELF_RENDERED + "an image"]
    assert _pairs(row) == [("", ""), (blob, "a blue tile")]
    assert not _needs_captions(row, MODEL)


def test_self_rendered_renders_give_way_to_real_ones(plain):
    reg, lora_id, folder, blob = plain
    _png(folder / "plain.preview.png", (5, 6, 7))
    reg.add(folder)
    row = reg.get(lora_id)
    assert len(row["render_blobs"]) == 1 and row["render_blobs"][0] != blob
    assert not any(p.startswith(SELF_RENDERED) for p in row["render_prompts"])
    assert _needs_captions(row, MODEL)  # the new render is captioned by the next pass
    assert "a blue tile" not in row["search_text"]


# ---- 3. duplicates in one run or in several ----------------------------------------------------

_CARD_FIELDS = ("name", "description", "trigger_words", "tags", "render_prompts", "render_blobs", "licence",
                "captions", "search_text")


@pytest.fixture(params=["sha256", "fingerprint"])
def triangle(request, tmp_path):
    """triangle.safetensors with its card and preview, and a bare re-upload of it."""
    folder = tmp_path / "loras"
    _save(folder / "triangle.safetensors", 4)
    if request.param == "sha256":
        shutil.copy(folder / "triangle.safetensors", folder / "triangle-reupload.safetensors")
    else:  # the same weights in another format, as the demo world re-uploads one LoRA
        _save(folder / "triangle-reupload.safetensors", 4, "kohya")
    _png(folder / "triangle.preview.png", (10, 200, 10))
    _card(folder / "triangle.json", name="Triangle", trigger_words=["tr1ngl"], license="mit",
          renders=[{"image": "triangle.preview.png", "prompt": "tr1ngl, a green triangle"}])
    return folder


def _card_data(reg: Registry) -> dict:
    row = reg.get(_only_id(reg))
    return {k: row[k] for k in _CARD_FIELDS}


@pytest.mark.parametrize("batch_size", [64, 1])
def test_a_duplicate_in_the_same_run_brings_its_card(triangle, tmp_path, batch_size):
    together = Registry.open(tmp_path / "together")
    report = together.add(triangle, batch_size=batch_size)
    assert len(report.added) == 1 and len(report.duplicates) == 1
    data = _card_data(together)
    assert data["name"] == "Triangle" and data["trigger_words"] == ["tr1ngl"] and data["licence"] == "mit"
    assert len(data["render_blobs"]) == 1 and data["render_prompts"] == ["tr1ngl, a green triangle"]

    for first in ("triangle-reupload.safetensors", "triangle.safetensors"):  # two runs, either first
        apart = Registry.open(tmp_path / f"apart-{first}")
        apart.add(triangle / first)
        apart.add(triangle)
        assert _card_data(apart) == data, first


def test_a_copy_without_a_card_is_named_like_the_one_with_a_card(tmp_path):
    """Without any card name, the name is the stem of the copy with a card, whichever came first."""
    folder = tmp_path / "loras"
    _save(folder / "zeta.safetensors", 5)
    shutil.copy(folder / "zeta.safetensors", folder / "alpha.safetensors")
    _card(folder / "zeta.json", trigger_words=["z3ta"])
    together = Registry.open(tmp_path / "together")
    together.add(folder)
    apart = Registry.open(tmp_path / "apart")
    apart.add(folder / "zeta.safetensors")
    apart.add(folder)
    assert _card_data(together) == _card_data(apart)
    assert _card_data(together)["name"] == "zeta"


# ---- 4. a removed duplicate takes its card data with it ------------------------------------------

def test_card_data_of_a_pruned_duplicate_leaves_the_row(tmp_path):
    blue = _save(tmp_path / "a" / "blue.safetensors", 6)
    copy = tmp_path / "b" / "blue-copy.safetensors"
    copy.parent.mkdir()
    shutil.copy(blue, copy)
    card = tmp_path / "b" / "blue-copy.json"
    _card(card, trigger_words=["gzmo"], license="mit")
    reg = Registry.open(tmp_path / "registry")
    reg.add([blue.parent, copy.parent])
    lora_id = _only_id(reg)
    assert reg.get(lora_id)["trigger_words"] == ["gzmo"] and reg.get(lora_id)["licence"] == "mit"

    saved = copy.read_bytes(), card.read_text()
    copy.unlink(), card.unlink()
    counts = reg.prune()  # the client runs the refresh
    assert counts["paths_gone"] == 1 and counts["removed"] == 0 and counts["refreshed"] == 1
    row = reg.get(lora_id)
    assert row["trigger_words"] == [] and row["licence"] is None and "gzmo" not in row["search_text"]
    assert row["name"] == "blue" and row["removed"] is False
    assert ingest.prune_and_refresh(reg)["refreshed"] == 0  # nothing changed since

    copy.write_bytes(saved[0]), card.write_text(saved[1])  # back: prune brings its card back too
    counts = ingest.prune_and_refresh(reg)
    assert counts["paths_back"] == 1 and counts["refreshed"] == 1
    assert reg.get(lora_id)["trigger_words"] == ["gzmo"]
