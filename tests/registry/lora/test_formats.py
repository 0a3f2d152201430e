"""registry.lora.formats (one module per format behind a registry) and the conversion's
diffusers cross-check on a sample of modules."""

from __future__ import annotations

import pytest
import torch
from flux_fixtures import (
    bfl_control_state,
    delta,
    fal_kontext_state,
    flux_lora,
    full_coverage_lora,
    max_delta_error,
    partial_names,
    top_level_names,
)

from registry.lora import conversion, formats
from registry.lora.canonical import canonicalise
from registry.lora.formats import (
    FORMATS,
    REGISTRY,
    detect_format,
    module_layers,
    split_key,
    to_format,
)

SINGLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out")


@pytest.fixture(scope="module")
def partial():
    return flux_lora(partial_names(), 4, seed=1)


@pytest.fixture(scope="module")
def xlabs_layers():
    """What XLabs can name: double-block attention, single-block q/k/v and linear2 (proj_out)."""
    names = partial_names((0, 18), (), attention_only=True)
    names += [f"single_transformer_blocks.{i}.{p}" for i in (2, 37) for p in SINGLE_ATTENTION]
    return flux_lora(names, 4, seed=2)


def test_registry_lists_every_format_once_with_writers_for_formats():
    names = [f.name for f in REGISTRY]
    assert len(names) == len(set(names)) and set(FORMATS) <= set(names)
    assert {n for n in names if formats.get(n).writer is None} == {"fal_kontext", "bfl_control",
                                                                  "peft"}
    with pytest.raises(ValueError, match="unknown format"):
        formats.get("lokr")
    with pytest.raises(ValueError, match="unknown format"):
        to_format({}, "fal_kontext")  # read, never written


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_written_format_is_detected_and_every_key_is_read(partial, xlabs_layers, fmt):
    state = to_format(xlabs_layers if fmt == "xlabs" else partial, fmt)
    assert detect_format(state) == fmt
    for key in state:
        module, role = split_key(key)
        assert role in ("down", "up", "alpha")
        assert module_layers(module) is not None, key


def test_read_only_formats_are_detected(partial):
    assert detect_format(fal_kontext_state(partial)) == "fal_kontext"
    assert detect_format(bfl_control_state(partial)) == "bfl_control"
    bare = {k.removeprefix("transformer."): v for k, v in to_format(partial, "diffusers").items()}
    assert detect_format(bare) == "peft"


def _states(partial, xlabs_layers) -> dict[str, dict]:
    states = {fmt: to_format(xlabs_layers if fmt == "xlabs" else partial, fmt) for fmt in FORMATS}
    states["fal_kontext"], states["bfl_control"] = fal_kontext_state(partial), bfl_control_state(partial)
    states["peft_with_alpha"] = {**states["diffusers"], "transformer.transformer_blocks.0.attn.to_q.alpha":
                                 torch.tensor(2.0)}
    states["kohya_with_dora_scale"] = {**states["kohya"], "lora_unet_double_blocks_0_img_attn_qkv.dora_scale":
                                       torch.ones(1, 3072)}
    return states


def test_the_light_dispatch_to_diffusers_converters_is_what_its_pipeline_class_does(partial, xlabs_layers):
    """``conversion.diffusers_lora_state_dict`` calls diffusers' converters without importing the
    pipeline class (3 s of a new process): for every format it must return what
    ``FluxPipeline.lora_state_dict`` returns, and refuse what it refuses."""
    from diffusers import FluxPipeline

    def copied(state):
        return {k: v.to(torch.float32, copy=True) for k, v in state.items()}

    def outcome(call, state):
        try:
            return call(copied(state))
        except Exception as error:  # noqa: BLE001  (a partial fal/Kontext file: both raise the same)
            return type(error), str(error)

    converted = 0
    for name, state in _states(partial, xlabs_layers).items():
        ours = outcome(conversion.diffusers_lora_state_dict, state)
        theirs = outcome(lambda s: FluxPipeline.lora_state_dict(s, return_alphas=True), state)
        if isinstance(theirs[0], type):
            assert ours == theirs, name
            continue
        (ours, our_alphas), (theirs, their_alphas), converted = ours, theirs, converted + 1
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
        assert (our_alphas or {}).keys() == (their_alphas or {}).keys(), name
        assert all(torch.equal(our_alphas[k], their_alphas[k]) for k in our_alphas or {}), name
    assert converted >= len(FORMATS) + 2
    bad = {**to_format(partial, "diffusers"), "transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(2)}
    for call in (lambda s: conversion.diffusers_lora_state_dict(s),
                 lambda s: FluxPipeline.lora_state_dict(s, return_alphas=True)):
        with pytest.raises(ValueError, match="alpha key"):
            call(dict(bad))


def test_xlabs_by_our_name_map_agrees_with_diffusers(xlabs_layers):
    state = to_format(xlabs_layers, "xlabs")
    assert "single_blocks.37.processor.proj_lora.down.weight" in state
    modules, _ = conversion.group(state)
    ours = conversion.convert(modules)
    theirs = conversion._via_diffusers(state)  # diffusers' XLabs converter on the whole file
    assert ours.keys() == theirs.keys() == xlabs_layers.keys()
    assert max_delta_error(xlabs_layers, theirs) < 1e-6
    lora = canonicalise(state, {})
    assert lora.format == "xlabs" and not lora.notes
    assert max_delta_error(xlabs_layers, lora.layers) < 1e-6


def test_fused_parts_share_one_a_and_alpha_folds_exactly():
    fused = {}  # a LoRA trained on the fused BFL layer: one A for q, k and v
    a = torch.randn(8, 3072, dtype=torch.bfloat16)
    for part in ("attn.to_q", "attn.to_k", "attn.to_v"):
        fused[f"transformer_blocks.2.{part}"] = (a, torch.randn(3072, 8, dtype=torch.bfloat16))
    state = to_format(fused, "kohya", alpha=2.0)  # scale 1/4: exact in bfloat16
    assert state["lora_unet_double_blocks_2_img_attn_qkv.lora_down.weight"].shape == (8, 3072)
    lora = canonicalise(state, {})
    assert all(f[0].dtype == f[1].dtype == torch.bfloat16 for f in lora.factors.values())
    got = delta(lora.factors["transformer_blocks.2.attn.to_k"])
    want = delta(fused["transformer_blocks.2.attn.to_k"])
    assert float((got - want).norm() / want.norm()) < 1e-6  # 4 B stored, A / 4 read: exact


def test_sample_holds_one_module_per_kind_the_last_blocks_and_swapped_ones():
    layers = full_coverage_lora(rank=2) | flux_lora(top_level_names(), 2, seed=3)
    modules, _ = conversion.group(to_format(layers, "kohya"))
    sample = conversion.sample_modules(modules)
    assert conversion.sample_modules(modules) == sample  # deterministic
    kinds = {conversion._NUMBER.sub("#", p) for p in modules}
    assert kinds == {conversion._NUMBER.sub("#", p) for p in sample}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in sample  # lowest-numbered of its kind
    assert any(p.startswith("lora_unet_double_blocks_18_") for p in sample)
    assert any(p.startswith("lora_unet_single_blocks_37_") for p in sample)
    assert "lora_unet_final_layer_adaLN_modulation_1" in sample  # B halves swap
    assert len(sample) <= len(kinds) + 2 + conversion._HASHED_MODULES


@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "onetrainer", "xlabs"])
def test_diffusers_runs_on_a_sample_only(monkeypatch, fmt):
    fed = []
    real = conversion._via_diffusers
    monkeypatch.setattr(conversion, "_via_diffusers", lambda t: fed.append(len(t)) or real(t))
    if fmt == "xlabs":  # every layer XLabs can name
        names = partial_names(range(19), range(38), attention_only=True)
        layers = flux_lora(names + [f"single_transformer_blocks.{i}.proj_out" for i in range(38)],
                           2, seed=5, dtype=torch.float16)
    else:
        layers = full_coverage_lora(rank=2)
    state = to_format(layers, fmt)
    lora = canonicalise(state, {})
    assert max_delta_error(layers, lora.layers) < 1e-3
    assert len(fed) == 1 and fed[0] < len(state) / 5


def test_whole_file_for_formats_whose_converter_needs_every_block(monkeypatch, partial):
    fed = []
    real = conversion._via_diffusers
    monkeypatch.setattr(conversion, "_via_diffusers", lambda t: fed.append(len(t)) or real(t))
    state = fal_kontext_state(partial)
    lora = canonicalise(state, {})
    assert fed == [len(state)] and any("diffusers: KeyError" in n for n in lora.notes)


def test_a_disagreement_on_the_sample_is_noted_and_our_map_wins():
    # diffusers' kohya converter ignores the final layer's alphas (a documented gap)
    layers = flux_lora(top_level_names(), 4, seed=4)
    lora = canonicalise(to_format(layers, "kohya", alpha=2.0), {})
    assert any("disagreed" in n for n in lora.notes)
    assert max_delta_error(layers, lora.layers) < 1e-6


def test_unknown_modules_fall_back_to_diffusers_or_are_rejected(monkeypatch, partial):
    from registry.lora.errors import RejectedFile

    state = to_format(partial, "kohya")
    state["lora_unet_double_blocks_0_img_attn_foo.lora_down.weight"] = torch.ones(4, 3072)
    state["lora_unet_double_blocks_0_img_attn_foo.lora_up.weight"] = torch.ones(3072, 4)
    with pytest.raises(RejectedFile) as info:
        canonicalise(state, {})
    assert info.value.code == "unsupported_layers" and "name map" in info.value.reason
    stand_in = partial | flux_lora(["transformer_blocks.5.attn.to_q"], 2, seed=9)
    monkeypatch.setattr(conversion, "_via_diffusers", lambda t: stand_in)  # diffusers knows it
    shapes = canonicalise(state, {}).shapes()
    assert len(shapes) == len(partial) + 1 and shapes["transformer_blocks.5.attn.to_q"] == (3072, 3072)


def test_a_written_file_has_the_same_bytes_in_every_process(tmp_path):
    """safetensors orders a header's metadata at random per process; save_lora's files (the demo
    world's LoRAs) must not change sha256 when they are written again."""
    import subprocess
    import sys
    from pathlib import Path

    script = """
import sys, torch
sys.path.insert(0, {root!r})
from registry.lora.formats import save_lora
gen = torch.Generator().manual_seed(0)
layers = {{f"transformer_blocks.0.attn.to_{{p}}": (torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen))
          for p in "qkv"}}
meta = {{"ss_network_dim": "2", "ss_network_alpha": "2", "ss_output_name": "x", "ss_base_model_version": "flux1",
        "modelspec.architecture": "flux-1-dev/lora", "modelspec.title": "x"}}
save_lora(sys.argv[1], layers, "kohya", metadata=meta)
""".format(root=str(Path(__file__).resolve().parents[3]))
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, capture_output=True)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    from registry.lora.safe_read import read_safetensors

    lora = canonicalise(*read_safetensors(paths[0]))
    assert sorted(lora.factors) == [f"transformer_blocks.0.attn.to_{p}" for p in "kqv"]


def test_a_keys_longest_role_suffix_wins():
    assert split_key("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight") == (
        "lora_unet_double_blocks_0_img_attn_qkv", "down")
    assert split_key("x.lora.down.weight") == ("x", "down")  # not ("x.lora", "down")
    assert split_key("x.attn.to_q.lora_linear_layer.up.weight") == ("x.attn.to_q", "up")
    assert split_key("transformer.x.lora_B.weight") == ("transformer.x", "up")
    assert split_key("x.alpha") == ("x", "alpha") and split_key(".alpha") == ("", "alpha")
    assert split_key("x.weight") is None and split_key("alpha") is None and split_key("x.lora_A.weight.y") is None
