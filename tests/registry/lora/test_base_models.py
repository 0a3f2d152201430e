"""registry.lora.base_models: FLUX.1-dev's real shapes, JSON round trip, base matching."""

from __future__ import annotations

import re

from flux_fixtures import partial_names, tiny_flux_base
from registry.lora.base_models import BaseModel, flux1_dev, match_base


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
