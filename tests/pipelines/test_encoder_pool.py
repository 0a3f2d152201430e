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
