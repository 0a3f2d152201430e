"""The demo world end to end through the CLI: build (micro), rebuild no-op, zoo ingest, diffusers
loading, evaluation; and (``-m slow``) the default world's quality targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

AUTOLORA = str(Path(sys.executable).with_name("autolora"))
LORA_SIDECAR_SUFFIXES = (".safetensors", ".json", ".png", ".civitai.info")


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([AUTOLORA, *args], capture_output=True, text=True, env=env, timeout=timeout)


def run_json(*args: str, timeout: int = 900):
    out = run(*args, "--json", timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("world")
    t0 = time.perf_counter()
    contract = run_json("world", "build", "--size", "micro", "--out", str(out))
    return {"out": out, "contract": contract, "wall": time.perf_counter() - t0}


def test_build_contract_and_budget(micro):
    c = micro["contract"]
    assert set(c) == {"base", "loras", "heldout_loras", "train", "heldout", "seconds"}
    assert (c["train"], c["heldout"]) == (6, 4)  # 3 held-out themes + 1 independently trained twin
    assert (Path(c["base"]) / "model_index.json").is_file()
    assert c["seconds"] <= 60, f"micro world took {c['seconds']:.1f} s (budget 60 s)"


def test_rebuild_is_a_noop(micro):
    first = micro["contract"]
    t0 = time.perf_counter()
    again = run_json("world", "build", "--size", "micro", "--out", str(micro["out"]))
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    assert again["seconds"] < 1.0 and time.perf_counter() - t0 < 60


def test_lora_folders_hold_only_loras_and_sidecars(micro):
    c = micro["contract"]
    for key, expected in (("loras", c["train"] + 1), ("heldout_loras", c["heldout"])):  # +1: the re-upload
        files = sorted(Path(c[key]).iterdir())
        assert all(f.is_file() and f.name.endswith(LORA_SIDECAR_SUFFIXES) for f in files), files
        loras = [f for f in files if f.suffix == ".safetensors"]
        assert len(loras) == expected
        for lora in loras:
            if lora.stem.endswith("-reupload"):
                continue
            card = json.loads(lora.with_suffix(".json").read_text())
            assert card["trigger_words"] and 1 <= len(card["renders"]) <= 5
            assert all((lora.parent / r["image"]).is_file() and r["prompt"] for r in card["renders"])


def test_heldout_synonym_words_never_used_in_training(micro):
    root = Path(micro["contract"]["base"]).parent
    manifest = json.loads((root / "world.json").read_text())
    train_words = {w for e in manifest["loras"] if e["split"] == "train" for w in e["words"]}
    synonym = [e for e in manifest["loras"] if e["synonym"]]
    assert synonym and all(e["split"] == "heldout" for e in synonym)
    assert not train_words & {w for e in synonym for w in e["words"]}
    train_cards = " ".join(p.read_text() for p in Path(micro["contract"]["loras"]).glob("*.json"))
    assert all(w not in train_cards for e in synonym for w in e["words"])


def test_zoo_ingests_with_zero_rejections_and_a_fingerprint_duplicate(micro, tmp_path):
    c = micro["contract"]
    registry = str(tmp_path / "registry")
    root = Path(c["base"]).parent
    by_json = run_json("register-base", str(root / "base_model.json"), "--registry", registry)
    by_folder = run_json("register-base", c["base"], "--registry", str(tmp_path / "other"))
    assert by_json == by_folder and by_json["name"] == "autolora-demo-flux"  # one name, either route
    report = run_json("ingest", c["loras"], c["heldout_loras"], "--registry", registry)
    assert report["rejected"] == []
    assert len(report["added"]) == c["train"] + c["heldout"]
    assert [d["kind"] for d in report["duplicates"]] == ["fingerprint"]
    dup = report["duplicates"][0]  # the re-upload and its original, whichever was walked first
    original = next(a for a in report["added"] if a["lora_id"] == dup["lora_id"])
    stems = {Path(dup["path"]).stem, Path(original["path"]).stem}
    theme = min(stems, key=len)
    assert stems == {theme, f"{theme}-reupload"}
    from registry import Registry

    reg = Registry.open(registry)
    assert {reg.get(e["lora_id"])["base_model"] for e in report["added"]} == {"autolora-demo-flux"}
    assert {reg.get(e["lora_id"])["format"] for e in report["added"]} >= {"diffusers", "kohya", "comfyui"}


def test_diffusers_users_can_load_the_world_files(micro):
    import torch
    from diffusers import FluxPipeline

    from pipelines.world.sampling import generate

    torch.set_num_threads(1)
    root = Path(micro["contract"]["base"]).parent
    pipe = FluxPipeline.from_pretrained(root / "base")
    pipe.set_progress_bar_config(disable=True)
    hub_repo = sorted((root / "hub").iterdir())[0]
    before = generate(pipe, ["a red circle"], seed=0, steps=4)
    pipe.load_lora_weights(hub_repo, weight_name="pytorch_lora_weights.safetensors", adapter_name="zoo")
    after = generate(pipe, ["a red circle"], seed=0, steps=4)
    assert pipe.get_active_adapters() == ["zoo"]
    assert np.abs(after.astype(int) - before.astype(int)).mean() > 0.5


def test_world_eval_cli_reports_base_and_lora_scores(micro):
    report = run_json("world", "eval", "--world", str(micro["out"]), "--base-prompts", "16",
                      "--lora-prompts", "2")
    base, loras = report["base"], report["loras"]
    assert set(base["accuracy"]) == {"shape", "colour", "background", "style"}
    assert all(0.0 <= v <= 1.0 for v in base["accuracy"].values())
    assert loras["count"] == micro["contract"]["train"] + micro["contract"]["heldout"]
    assert loras["gain"] == pytest.approx(loras["with_lora"] - loras["without_lora"])
    world = json.loads((Path(micro["contract"]["base"]).parent / "world.json").read_text())
    manifest = {e["theme"]: e for e in world["loras"]}
    for key, field in (("by_split", "split"), ("by_coverage", "target"), ("by_rank", "rank")):
        groups = loras[key]
        assert sum(g["count"] for g in groups.values()) == loras["count"]
        for name, g in groups.items():  # each group is the mean of its LoRAs' own scores
            members = [s for s in loras["per_lora"] if str(manifest[s["theme"]][field]) == name]
            assert g["count"] == len(members) > 0
            assert g["with_lora"] == pytest.approx(np.mean([s["with_lora"] for s in members]))


@pytest.mark.slow
def test_default_world_meets_its_targets(tmp_path_factory):
    """Default world: ≥ 60 + 20 LoRAs in ≤ 10 min; the base follows prompts well above chance;
    LoRAs show their themes (≥ 0.8) far more than the same prompts without them (≥ +0.3)."""
    out = Path(os.environ.get("AUTOLORA_WORLD_DIR") or tmp_path_factory.mktemp("default-world"))
    contract = run_json("world", "build", "--size", "default", "--out", str(out), timeout=3600)
    assert contract["train"] >= 60 and contract["heldout"] >= 20
    manifest = json.loads((Path(contract["base"]).parent / "world.json").read_text())
    assert manifest["build_seconds"] <= 600, manifest["build_seconds"]
    report = run_json("world", "eval", "--world", str(out), timeout=3600)
    chance, acc = report["base"]["chance"], report["base"]["accuracy"]
    assert all(acc[a] >= 2 * chance[a] for a in acc), acc
    assert report["loras"]["with_lora"] >= 0.8, report["loras"]
    assert report["loras"]["gain"] >= 0.3, report["loras"]


def test_a_partial_build_of_another_recipe_is_wiped(tmp_path):
    from pipelines.world.build import _reset_if_stale

    root = tmp_path / "micro-seed0"
    (root / "base").mkdir(parents=True)
    (root / "base" / "model_index.json").write_text("{}")  # left by an older recipe, no marker
    _reset_if_stale(root, "k1", "b1")
    assert sorted(p.name for p in root.iterdir()) == ["base.key", "recipe.key"]
    (root / "loras").mkdir()
    (root / "base").mkdir()
    _reset_if_stale(root, "k1", "b1")  # same recipe: resume, keep what is there
    assert (root / "loras").is_dir()
    _reset_if_stale(root, "k2", "b1")  # another recipe on the same base: the base stays
    assert not (root / "loras").exists() and (root / "base").is_dir()
    _reset_if_stale(root, "k3", "b2")  # another base recipe: everything goes
    assert not (root / "base").exists()


def test_heldout_twins_are_independent_loras_of_one_family():
    from pipelines.world.themes import make_themes, make_twins

    themes = make_themes(0, 60, 20)
    twins = make_twins(themes, 6, 0)
    heldout = {t.name: t for t in themes if t.split == "heldout"}
    assert len(twins) == 9 and all(t.split == "heldout" for t in twins)
    families = {t.family for t in twins}
    assert len(families) == 6 and families <= set(heldout)
    assert any(heldout[f].synonym for f in families) and not all(heldout[f].synonym for f in families)
    for t in twins:
        assert dict(t.attrs) == dict(heldout[t.family].attrs) and t.synonym == heldout[t.family].synonym
    names = [t.name for t in themes + twins]
    triggers = [t.trigger for t in themes + twins]
    assert len(set(names)) == len(names) and len(set(triggers)) == len(triggers)
