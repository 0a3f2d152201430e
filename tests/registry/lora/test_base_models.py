"""registry.lora.base_models: FLUX.1-dev's and -schnell's real shapes, JSON round trip, base
matching (shapes first, metadata hints where shapes fit several bases)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from flux_fixtures import TINY_FLUX_CONFIG, flux_lora, partial_names, tiny_flux_base, top_level_names

from registry.lora.base_models import (
    BUILTIN_BASE_NAMES,
    BaseModel,
    builtin_bases,
    flux1_dev,
    flux1_schnell,
    match_base,
)
from registry.lora.formats import save_lora
from registry.lora.inspect import inspect_file

GUIDANCE = ("time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2")


def test_flux1_dev_blocks_and_shapes():
    base = flux1_dev()
    assert base.name == "FLUX.1-dev" and base.architecture == "flux"
    shapes = base.layer_shapes
    double = {m.group(1) for n in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", n))}
    single = {m.group(1) for n in shapes
              if (m := re.match(r"single_transformer_blocks\.(\d+)\.", n))}
    assert len(double) == 19 and len(single) == 38
    assert len(shapes) == 19 * 14 + 38 * 6 + 10
    assert shapes["transformer_blocks.0.attn.to_q"] == (3072, 3072)
    assert shapes["transformer_blocks.18.ff.net.0.proj"] == (12288, 3072)
    assert shapes["transformer_blocks.0.norm1.linear"] == (18432, 3072)
    assert shapes["transformer_blocks.0.attn.add_k_proj"] == (3072, 3072)
    assert shapes["single_transformer_blocks.0.proj_mlp"] == (12288, 3072)
    assert shapes["single_transformer_blocks.0.proj_out"] == (3072, 15360)
    assert shapes["single_transformer_blocks.37.norm.linear"] == (9216, 3072)
    assert shapes["x_embedder"] == (3072, 64) and shapes["context_embedder"] == (3072, 4096)
    assert shapes["norm_out.linear"] == (6144, 3072) and shapes["proj_out"] == (64, 3072)
    assert flux1_dev() is base  # cached


def test_the_shipped_builtin_shapes_are_what_diffusers_builds(tmp_path):
    """The built-in bases are read from a file (a new process need not import the diffusers model,
    ~5 s); it must hold exactly what diffusers' FluxTransformer2DModel has under each config.
    After a diffusers change: ``.venv/bin/python -c "from registry.lora.base_models import
    write_builtin_bases; write_builtin_bases()"``."""
    from registry.lora import base_models

    for name, config in base_models.BUILTIN_CONFIGS.items():
        built = base_models._flux_base(name, config)
        assert base_models._builtin(name) == built, f"{name}: rewrite {base_models.BUILTIN_BASES_FILE.name}"
    base_models.write_builtin_bases(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == base_models.BUILTIN_BASES_FILE.read_text()


def test_a_new_process_finds_the_builtin_bases_without_importing_diffusers():
    code = ("import sys; from registry.lora.base_models import builtin_bases; "
            "assert [b.name for b in builtin_bases()] == ['FLUX.1-dev', 'FLUX.1-schnell']; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers', 'peft')]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])


def test_json_round_trip():
    base = flux1_dev()
    again = BaseModel.from_json(base.to_json())
    assert again == base and hash(again) == hash(base)
    assert again.layer_shapes["single_transformer_blocks.0.proj_out"] == (3072, 15360)


def test_from_flux_transformer_on_a_tiny_model():
    tiny = tiny_flux_base()
    assert tiny.architecture == "flux"
    assert tiny.layer_shapes["transformer_blocks.1.attn.to_q"] == (32, 32)
    assert tiny.layer_shapes["single_transformer_blocks.0.proj_out"] == (32, 32 + 128)


def test_from_flux_transformer_refuses_other_models_and_loaded_loras():
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    with pytest.raises(ValueError, match="expected a diffusers FluxTransformer2DModel, not Sequential"):
        BaseModel.from_flux_transformer("x", torch.nn.Sequential(torch.nn.Linear(4, 4)))
    model = FluxTransformer2DModel(**TINY_FLUX_CONFIG)
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))  # as pipe.load_lora_weights leaves it
    with pytest.raises(ValueError, match="LoRA layers loaded"):
        BaseModel.from_flux_transformer("x", model)


def test_match_base():
    flux, tiny = flux1_dev(), tiny_flux_base()
    lora = {n: flux.layer_shapes[n] for n in partial_names()}
    assert match_base(lora, [tiny, flux]) is flux
    assert match_base({"transformer_blocks.1.attn.to_q": (32, 32)}, [flux, tiny]) is tiny
    assert match_base({**lora, "transformer_blocks.0.attn.to_q": (3072, 128)}, [flux, tiny]) is None
    assert match_base({"transformer_blocks.40.attn.to_q": (3072, 3072)}, [flux]) is None
    assert match_base({}, [flux]) is None
    te = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (768, 768)}
    assert match_base({**lora, **te}, [flux]) is flux  # text-encoder layers are not the base's
    bigger = BaseModel("FLUX-bigger", "flux", {**flux.layer_shapes, "extra.layer": (8, 8)})
    assert match_base(lora, [bigger, flux]) is flux  # both fit: the one the LoRA covers most wins


def test_flux1_schnell_is_dev_without_the_guidance_embedder():
    dev, schnell = flux1_dev(), flux1_schnell()
    assert schnell.name == "FLUX.1-schnell" and schnell.architecture == "flux"
    assert set(dev.layer_shapes) - set(schnell.layer_shapes) == set(GUIDANCE)
    assert all(dev.layer_shapes[n] == shape for n, shape in schnell.layer_shapes.items())
    assert builtin_bases() == [dev, schnell] and flux1_schnell() is schnell


def test_builtin_names_are_known_without_torch():
    """Search's unknown-base message lists the built-in bases without building them (no torch)."""
    assert [b.name for b in builtin_bases()] == list(BUILTIN_BASE_NAMES)
    code = "import sys, registry.lora.base_models as b; print(b.BUILTIN_BASE_NAMES, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3]).stdout
    assert out.strip() == "('FLUX.1-dev', 'FLUX.1-schnell') False"


SCHNELL_HINTS = ["flux1_schnell", "flux-1-schnell/lora", "Flux.1 S", "FLUX.1-schnell",
                 "black-forest-labs/FLUX.1-schnell", "flux1-schnell.safetensors"]


@pytest.mark.parametrize("hint", SCHNELL_HINTS)
def test_a_hint_names_schnell(hint):
    lora = {n: flux1_dev().layer_shapes[n] for n in partial_names()}
    assert match_base(lora, builtin_bases(), hint) is flux1_schnell()


@pytest.mark.parametrize("hint", ["", "flux1", "Flux.1 D", "flux-1-dev/lora", "FLUX.1-dev",
                                  "sdxl_base_v1-0", "Flux.1 Kontext"])
def test_without_a_schnell_hint_dev_wins(hint):
    lora = {n: flux1_dev().layer_shapes[n] for n in partial_names()}
    assert match_base(lora, builtin_bases(), hint) is flux1_dev()
    assert match_base(lora, [flux1_schnell(), flux1_dev()], hint) is flux1_dev()  # any order


def test_guidance_layers_fit_only_dev_and_hints_only_choose_among_fits():
    dev, schnell, tiny = flux1_dev(), flux1_schnell(), tiny_flux_base()
    lora = {n: dev.layer_shapes[n] for n in [*partial_names(), *GUIDANCE]}
    assert match_base(lora, builtin_bases(), "Flux.1 S") is dev
    assert match_base(lora, [schnell], "Flux.1 S") is None
    only_schnell = {n: dev.layer_shapes[n] for n in partial_names()}
    assert match_base(only_schnell, [schnell]) is schnell  # no other base fits
    # the earliest-named fitting base wins ("|" separates the header's hint from a card's)
    assert match_base(only_schnell, builtin_bases(), "flux-1-dev/lora | Flux.1 S") is dev
    assert match_base(only_schnell, builtin_bases(), "Flux.1 S | flux-1-dev/lora") is schnell
    # registered bases keep matching by shapes, and a hint can name them too
    assert match_base({"transformer_blocks.1.attn.to_q": (32, 32)}, [*builtin_bases(), tiny],
                      "Flux.1 S") is tiny
    twin = BaseModel("my-flux", "flux", dev.layer_shapes)
    assert match_base(only_schnell, [*builtin_bases(), twin], "trained on my-flux") is twin


def _save(path, metadata=None):
    layers = flux_lora(partial_names((0,), (), attention_only=True), 2, seed=3)
    save_lora(path, layers, "kohya", metadata=metadata)
    return path


@pytest.mark.parametrize("metadata", [{"modelspec.architecture": "flux-1-schnell/lora"},
                                      {"ss_base_model_version": "flux1_schnell"},
                                      {"ss_base_model_version": "flux1",
                                       "ss_sd_model_name": "flux1-schnell.safetensors"}])
def test_inspect_reads_a_schnell_label_from_the_header(tmp_path, metadata):
    info = inspect_file(_save(tmp_path / "s.safetensors", metadata), builtin_bases())
    assert info.base_model == "FLUX.1-schnell"


def test_inspect_takes_the_callers_hint_after_the_header(tmp_path):
    plain = _save(tmp_path / "plain.safetensors")
    assert inspect_file(plain, builtin_bases()).base_model == "FLUX.1-dev"  # unlabelled
    assert inspect_file(plain, builtin_bases(), base_hint="Flux.1 S").base_model == "FLUX.1-schnell"
    dev = _save(tmp_path / "dev.safetensors", {"modelspec.architecture": "flux-1-dev/lora"})
    assert inspect_file(dev, builtin_bases(), base_hint="Flux.1 S").base_model == "FLUX.1-dev"
    top = flux_lora(top_level_names(), 2, seed=4)  # adapts the guidance embedder: dev only
    save_lora(tmp_path / "g.safetensors", top, "kohya")
    info = inspect_file(tmp_path / "g.safetensors", builtin_bases(), base_hint="FLUX.1-schnell")
    assert info.base_model == "FLUX.1-dev"


@pytest.mark.parametrize("text, why", [
    ("not json", "not JSON"),
    ("[1, 2]", "not an object"),
    ('{"architecture": "flux", "layer_shapes": {"a": [2, 2]}}', "no name"),
    ('{"name": "x", "layer_shapes": {"a": [2, 2]}}', "no architecture"),
    ('{"name": "x", "architecture": "flux", "layer_shapes": {}}', "layer_shapes"),
    ('{"name": "x", "architecture": "flux", "layer_shapes": {"a": [2, "2"]}}', "layer_shapes"),
    ('{"name": "x", "architecture": "flux", "layer_shapes": {"a": [2, 0]}}', "layer_shapes"),
])
def test_from_json_says_what_is_wrong(text, why):
    with pytest.raises(ValueError, match=why):
        BaseModel.from_json(text)


def test_from_json_renames():
    base = BaseModel("a", "flux", {"proj": (4, 8)})
    assert BaseModel.from_json(base.to_json(), "b") == BaseModel("b", "flux", {"proj": (4, 8)})


def test_a_registry_names_a_broken_base_file(tmp_path):
    from registry import Registry

    reg = Registry.open(tmp_path / "reg")
    reg.register_base(BaseModel("mine", "flux", {"proj": (4, 4)}))
    broken = next((tmp_path / "reg" / "bases").glob("*.json"))
    broken.write_text('{"name": "mine"}')
    with pytest.raises(ValueError, match=r"mine\.json: not a base model description \(no architecture"):
        reg.bases()
    broken.write_text("{")
    with pytest.raises(ValueError, match="mine.json: not a base model description"):
        reg.base_names()
