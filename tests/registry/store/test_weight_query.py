"""The weight channel's query vectors for an encoder trained against another text encoder: the
prompt through that text encoder and the encoder's own text map, read with numpy, equal to what
the encoder computes in torch; an encoder trained against the default needs no map."""

from __future__ import annotations

import numpy as np
import torch

from models.encoder import EncoderConfig, LayerSpec, LoRAWeightEncoder
from models.text_encoder import default_text_encoder, load_text_encoder
from registry.store.weight_query import TEXT_MAP, query_vectors

SPECS = [LayerSpec("transformer_blocks.0.attn.to_q", 16, 16)]
TEXTS = ["a red star", "hatched style"]


def _saved(tmp_path, text_dim: int):
    torch.manual_seed(0)
    encoder = LoRAWeightEncoder(SPECS, EncoderConfig.ours(width=32, depth=0, pool="mean", probe_dim=8,
                                                          text_dim=text_dim))
    path = tmp_path / f"enc{text_dim}.safetensors"
    encoder.save(path, f"v{text_dim}", {})
    return encoder, path


def test_query_vectors_go_through_the_encoders_own_text_map(tmp_path, tiny_clip_pipeline):
    encoder, path = _saved(tmp_path, text_dim=32)
    assert TEXT_MAP in encoder.state_dict()
    spec = f"clip:{tiny_clip_pipeline}"
    got = query_vectors(spec, path, TEXTS)
    with torch.no_grad():
        expected = encoder.project_text(torch.from_numpy(load_text_encoder(spec).encode(TEXTS))).numpy()
    assert got.shape == (2, 384) and np.allclose(got, expected, atol=1e-5)
    loaded = LoRAWeightEncoder.load(path)  # the map survives a save and load
    assert torch.equal(loaded.text_proj.weight, encoder.text_proj.weight)


def test_an_encoder_of_the_default_text_encoder_has_no_map(tmp_path):
    encoder, path = _saved(tmp_path, text_dim=0)
    assert encoder.text_proj is None
    assert np.array_equal(query_vectors("", path, TEXTS), default_text_encoder().encode(TEXTS))
