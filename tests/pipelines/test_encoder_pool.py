"""The encoder's recipe records local folders absolute, so a retraining started elsewhere finds them."""

from __future__ import annotations

from pipelines.encoder_pool import Recipe, version_of


def test_a_recipe_makes_local_folders_absolute_and_leaves_hub_ids_and_names(tmp_path, monkeypatch):
    base = tmp_path / ".autolora" / "world" / "default-seed0" / "base"
    base.mkdir(parents=True)
    (tmp_path / "clip").mkdir()  # a folder named like the "clip" keyword does not capture it
    monkeypatch.chdir(tmp_path)
    relative = ".autolora/world/default-seed0/base"
    recipe = Recipe(probes_from=relative, text_encoder=f"clip:{relative}")
    assert recipe.probes_from == str(base) and recipe.text_encoder == f"clip:{base}"

    monkeypatch.chdir(base)  # the same recipe, recorded and rebuilt from anywhere, is the same version
    again = Recipe(**recipe.__dict__)
    assert again == recipe and version_of(["a"], "b", again) == version_of(["a"], "b", recipe)

    monkeypatch.chdir(tmp_path)
    kept = Recipe(probes_from="black-forest-labs/FLUX.1-dev", text_encoder="clip")
    assert (kept.probes_from, kept.text_encoder) == ("black-forest-labs/FLUX.1-dev", "clip")
    assert Recipe(text_encoder="sentence-transformers/all-MiniLM-L6-v2").text_encoder == (
        "sentence-transformers/all-MiniLM-L6-v2")


def test_texts_leave_out_hashes_default_names_and_empty_parts():
    from pipelines.encoder_pool import lora_texts

    hashed = {"name": "3f9a2b7c41d05e68", "description": "", "tags": ["e3b0c442"], "render_prompts": [],
              "captions": []}
    assert lora_texts(hashed) == []
    assert lora_texts({**hashed, "name": "pytorch_lora_weights"}) == []
    captioned = {**hashed, "tags": ["e3b0c442", "jade"], "captions": ["a jade pyramid", "  "]}
    assert lora_texts(captioned) == ["jade", "a jade pyramid"]
    named = {"name": "jade pyramid", "description": "a green stone", "tags": ["shape"],
             "render_prompts": ["a jade pyramid on sand"], "captions": None}
    assert lora_texts(named) == ["jade pyramid a green stone shape", "a jade pyramid on sand"]


def test_a_lora_known_only_by_its_hash_stays_in_the_pool_but_is_not_trained_on(micro_world, tmp_path, capsys):
    """Its hash as a 'text' taught the encoder to map weights to noise; it is no training pair."""
    import shutil

    import pytest

    from pipelines.encoder_pool import PoolError, train_pool_encoder
    from registry import BaseModel, Registry

    named, hashed = tmp_path / "named", tmp_path / "hashed"
    named.mkdir(), hashed.mkdir()
    for stem in ("blue-bg-checkered", "square"):
        for file in (micro_world / "loras").glob(f"{stem}.*"):
            shutil.copy(file, named / file.name)
    shutil.copy(micro_world / "loras" / "circle-style-hatched.safetensors", hashed / "0f3a9c2b7d5e4a61.safetensors")
    reg = Registry.open(tmp_path / "reg")
    base = BaseModel.from_json((micro_world / "base_model.json").read_text())
    reg.register_base(base)
    reg.add([named, hashed])
    encoder, info = train_pool_encoder(reg, base.name, recipe=Recipe(steps=2, batch_size=2))
    assert (info["pool_size"], info["trained_on"]) == (3, 2)
    (lora_id,) = [r["lora_id"] for r in reg.rows(reg.loras, "name = '0f3a9c2b7d5e4a61'", 1)]
    assert lora_id in info["pool"]
    from pipelines import cli

    assert cli.main(["train", "encoder", "--registry", str(reg.root), "--steps", "2"]) == 0
    said = capsys.readouterr().out
    assert "trained on 2 LoRAs of" in said and "(1 more in the pool have no name, card, prompt or caption" in said

    only_one = Registry.open(tmp_path / "reg2")
    only_one.register_base(base)
    only_one.add([hashed, *named.glob("square.*")])
    with pytest.raises(PoolError, match="1 of the training pool's 2 LoRAs .* have a name"):
        train_pool_encoder(only_one, base.name, recipe=Recipe(steps=2, batch_size=2))
