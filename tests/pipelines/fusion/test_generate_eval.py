"""Generator, CLI and both evaluation contracts on the micro demo world (~45 s with its build; the
build is shared with the other tests of the session)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from pipelines.evaluate.fusion import KEYS, concept_sets, evaluate_fusion, set_prompts
from pipelines.evaluate.generation import GROUPS, SETTINGS, evaluate_generation, word_prompts
from pipelines.fusion_methods.base import transformer_state
from pipelines.generate import Generator, RenderSettings, with_triggers
from pipelines.train_gates import GateRecipe, train_world_gates



@pytest.fixture(scope="module")
def pipe(micro_world) -> FluxPipeline:
    torch.set_num_threads(1)
    p = FluxPipeline.from_pretrained(micro_world / "base")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def gates(micro_world, tmp_path_factory):
    return train_world_gates(micro_world, tmp_path_factory.mktemp("gates"), GateRecipe(steps=4, batch_size=2)).gates


@pytest.fixture(scope="module")
def paper_gates(micro_world, tmp_path_factory):
    """Gates trained the authors' way (their init, eq. 10 alone), for the reports' anchor rows."""
    recipe = GateRecipe(steps=2, batch_size=2, init="authors", composite=0.0)
    return train_world_gates(micro_world, tmp_path_factory.mktemp("paper-gates"), recipe).gates


def test_with_triggers():
    assert with_triggers("a red disc", ["xyz", "red", "xyz"]) == "xyz, a red disc"


def test_the_generator_renders_with_its_settings(micro_registry, pipe):
    small = RenderSettings(steps=2, size=16, true_cfg=1.0)
    with Generator(micro_registry, pipe, method="none", render=small) as gen:
        assert gen.generate("a circle", k=0).images.shape == (1, 16, 16, 3)


def test_generator_ids_and_retrieval(micro_registry, pipe, gates):
    before = transformer_state(pipe)
    ids = micro_registry.lora_ids()
    with Generator(micro_registry, pipe, gates) as gen:
        wrappers = None
        by_id = gen.generate("a circle", lora_ids=ids[:2], seed=3, n=2)
        assert by_id.lora_ids == ids[:2] and by_id.images.shape == (2, 32, 32, 3)
        for lora_id in ids[:2]:
            assert all(t in by_id.prompt for t in gen.triggers(lora_id))
        wrappers = dict(gen._session.fusion.layers)
        found = gen.generate("a rhombus on a lined background", k=2, seed=3)
        assert len(found.lora_ids) == 2 and [h["lora_id"] for h in found.hits] == found.lora_ids
        assert all(w in found.prompt for h in found.hits for w in h["trigger_words"])
        # the second LoRA set went into the same wrappers: no re-wrapping, no reload
        assert all(gen._session.fusion.layers[n] is w for n, w in wrappers.items())
        again = gen.generate("a circle", lora_ids=ids[:2], seed=3, n=2)
        assert np.array_equal(again.images, by_id.images)
        other = gen.generate("a circle", lora_ids=ids[:2], seed=3, n=2, method="linear")
        assert other.method == "linear"
        with pytest.raises(KeyError):
            gen.generate("x", lora_ids=["lora-nope"])
    after = transformer_state(pipe)
    assert after["types"] == before["types"]
    assert all(torch.equal(before["params"][k], v) for k, v in after["params"].items())


def test_render_with_other_gates_for_one_call(micro_registry, pipe, gates):
    """``Generator.render(..., gates=...)`` fuses with those gates for that call only (the anchor's in the
    generation report); the generator's own gates are back for the next call."""
    import dataclasses

    ids = [h.lora_id for h in micro_registry.search("a red circle", k=2)]
    other = dataclasses.replace(gates, version="doubled",
                                state={k: v * 2 if k.endswith(".w_o") else v for k, v in gates.state.items()})
    with Generator(micro_registry, pipe, gates) as gen:
        ours = gen.render(["a red circle"], ids, seed=3)
        theirs = gen.render(["a red circle"], ids, seed=3, gates=other)
        again = gen.render(["a red circle"], ids, seed=3)
    assert not np.array_equal(ours, theirs) and np.array_equal(ours, again)


def test_fusion_report_contract(micro_world, pipe, gates, tmp_path):
    report = evaluate_fusion(micro_world, tmp_path, gates=gates, n_sets=1, n_prompts=2, n_loss=4, pipe=pipe,
                             progress=False, methods=["linear", "gated"])
    assert set(report) == {"base", "single", "single_own_trigger", "linear", "gated"}
    for row in report.values():
        assert set(row) == set(KEYS)
        assert 0.0 <= row["k2_accuracy"] <= 1.0 and row["loss_ratio"] > 0
    assert report["single"]["loss_ratio"] == report["single_own_trigger"]["loss_ratio"] == 1.0
    assert json.loads((tmp_path / "fusion.json").read_text()) == report
    markdown = (tmp_path / "fusion.md").read_text()
    assert (tmp_path / "fusion_k2.png").is_file() and "| gated |" in markdown
    first = concept_sets([e for e in json.loads((micro_world / "world.json").read_text())["loras"]
                          if e["split"] == "heldout"], 2, 1, 0)[0]
    per_set = markdown.split("## Per set")[1].split("##")[0]  # one row per set: its concepts, then each row's
    assert f"| 2 | {', '.join(e['theme'] for e in first)} |" in per_set and "| gated |" in per_set


def test_fusion_report_puts_the_authors_gates_beside_ours(micro_world, pipe, gates, paper_gates, tmp_path):
    """``gated_paper`` (the anchor) runs the gated layer with gates trained the authors' way; without
    those gates the row is left out rather than run with untrained ones."""
    assert paper_gates.meta["recipe"]["init"] == "authors" and paper_gates.version != gates.version
    report = evaluate_fusion(micro_world, tmp_path, gates=gates, gates_paper=paper_gates, n_sets=1, n_prompts=2,
                             n_loss=4, pipe=pipe, progress=False, methods=["gated_paper", "gated"])
    assert {"gated_paper", "gated"} <= set(report) and report["gated_paper"] != report["gated"]
    markdown = (tmp_path / "fusion.md").read_text()
    assert "| gated_paper |" in markdown and f"`gated_paper`): `{paper_gates.version}`" in markdown
    without = evaluate_fusion(micro_world, tmp_path / "without", gates=gates, n_sets=1, n_prompts=2, n_loss=4,
                              pipe=pipe, progress=False, methods=["gated_paper", "linear"])
    assert "gated_paper" not in without and "linear" in without


def test_own_trigger_prompts_keep_the_scene_and_drop_the_other_triggers():
    entries = [{"trigger": "zq1", "attrs": {"shape": "circle"}}, {"trigger": "vx2", "attrs": {"colour": "red"}},
               {"trigger": "kp3", "attrs": {"style": "outline"}}]
    prompts, stated = set_prompts(entries, 4, 7)
    own, own_stated = set_prompts(entries, 4, 7, triggers_of=[entries[1]])
    assert own_stated == stated
    assert own == ["vx2, " + p[len("zq1, vx2, kp3, "):] for p in prompts]
    assert all(p.startswith("zq1, vx2, kp3, ") for p in prompts)


def test_fusion_sets_and_prompts(micro_world):
    heldout = [e for e in json.loads((micro_world / "world.json").read_text())["loras"] if e["split"] == "heldout"]
    for entries in concept_sets(heldout, 2, 5, 0):
        keys = [set(e["attrs"]) for e in entries]
        assert not keys[0] & keys[1]
        prompts, stated = set_prompts(entries, 3, 0)
        for p, s in zip(prompts, stated):
            assert all(e["trigger"] in p for e in entries)
            assert not set(s) & (keys[0] | keys[1])


def test_generation_report_contract(micro_world, micro_registry, pipe, gates, paper_gates, tmp_path):
    import shutil

    from pipelines.encoder_pool import Recipe, train_registry_encoder
    from registry import Registry

    shutil.copytree(micro_registry.root, tmp_path / "registry")
    registry = Registry.open(tmp_path / "registry", create=False)
    base = json.loads((micro_world / "base_model.json").read_text())["name"]
    train_registry_encoder(registry, base, recipe=Recipe(steps=3, batch_size=4))  # ours, so the anchor has a pool
    report = evaluate_generation(registry, micro_world, tmp_path, gates=gates, gates_paper=paper_gates,
                                 n_prompts=2, pipe=pipe, progress=False)
    assert report["anchor_encoder"]["version"].startswith("enc-paper-") and report["anchor_encoder"]["pool_size"] > 0
    assert report["anchor_gates"] == paper_gates.version
    assert f"the anchor's (`paper_top*`): `{paper_gates.version}`" in (tmp_path / "generation.md").read_text()
    heldout = [e for e in json.loads((micro_world / "world.json").read_text())["loras"] if e["split"] == "heldout"]
    for group in GROUPS:
        has = group == "all" or any(e["synonym"] == (group == "synonym") for e in heldout)
        for s in SETTINGS:
            value = report[group][s]
            assert (value is not None and 0.0 <= value <= 1.0) if has else value is None
    entry = heldout[0]
    prompts, _ = word_prompts(entry, 3, 0)
    assert all(entry["trigger"] not in p for p in prompts)
    assert all(not math.isnan(v) for v in report["retrieval_found"].values())
    cut = report["clip_cut"]  # triggers only make prompts longer
    assert set(cut) == set(SETTINGS) and all(0.0 <= v <= 1.0 for v in cut.values())
    assert cut["base"] == cut["own1_without_trigger"] <= cut["own1"] == cut["base_with_trigger"]
    assert "longer than the base's CLIP tokenizer takes" in (tmp_path / "generation.md").read_text()
    # without an active encoder there is no authors' design to retrieve with: no anchor rows, said so
    bare = evaluate_generation(micro_registry, micro_world, tmp_path / "bare", gates=gates, n_prompts=1, pipe=pipe,
                               progress=False)
    assert bare["anchor_encoder"] is None and bare["all"]["paper_top1"] is None and bare["all"]["top1"] is not None
    assert bare["anchor_gates"] is None
    assert "no anchor rows" in (tmp_path / "bare" / "generation.md").read_text()


def test_clip_cut_counts_prompts_past_the_clip_tokenizers_length(pipe):
    from pipelines.evaluate.generation import clip_cut

    limit = pipe.tokenizer.model_max_length
    assert clip_cut(pipe, ["a red disc", " ".join(["word"] * (limit + 1))]) == [False, True]


def test_cli_generate(micro_world, micro_registry, tmp_path, capsys):
    from pipelines.cli import _quiet, build_parser
    from pipelines.cli_generate import add_commands

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    if "eval" not in sub.choices:  # the lead wires add_commands into build_parser
        evaluate = sub.add_parser("eval").add_subparsers(dest="what", required=True)
        add_commands(sub, evaluate)
    out = tmp_path / "img.png"
    args = parser.parse_args(["generate", "a red diamond", "--registry", str(micro_registry.root), "-k", "2",
                              "--fusion", "linear", "-o", str(out), "--world", str(micro_world), "--json"])
    _quiet()
    assert args.func(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert out.is_file() and len(info["loras"]) == 2 and info["fusion"] == "linear"


def test_cli_train_gates_with_a_recipe_then_cached(micro_world, tmp_path, capsys):
    from pipelines.cli import main
    from pipelines.train_gates import load_gates

    argv = ["train", "gates", "--world", str(micro_world), "--out", str(tmp_path), "--steps", "2",
            "--time-features", "4", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert not first["cached"] and first["recipe"]["time_features"] == 4 and first["recipe"]["steps"] == 2
    gates = load_gates(first["path"])
    assert gates.time_features == 4 and gates.version == first["version"]
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["cached"] and again["path"] == first["path"]
    assert main(["train", "gates", "--world", str(tmp_path / "nowhere")]) == 2  # a usage error, no traceback
