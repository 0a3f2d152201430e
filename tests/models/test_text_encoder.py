"""The default text encoder: the bundled all-MiniLM-L6-v2 run by a numpy forward pass, checked
against sentence-transformers (reference vectors it made, stored beside this file; the live
comparison is a slow test) and kept free of torch so a cold search stays fast.

Regenerate the reference after changing TEXTS: ``.venv/bin/python tests/models/test_text_encoder.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.text_encoder import default_text_encoder

REFERENCE = Path(__file__).with_name("minilm_reference.npy")
TEXTS = [
    "a watercolor painting of a fox",
    "",
    "x",
    "Ocean waves by the sea, crashing; ÉMOTION naïve café 東京 🙂",
    "pixel art style, 8-bit, retro game sprite, trigger: pxl8 " * 3,
    "neon " * 300,  # past the 256-token limit: truncated like sentence-transformers
    "lora_unet_double_blocks_0_img_attn_qkv <lora:foo:0.8> (masterpiece:1.2), [bar]",
]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return default_text_encoder().encode(TEXTS, batch_size=2)


def test_matches_sentence_transformers_reference(vectors):
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert _cosines(vectors, np.load(REFERENCE)).min() >= 0.9999


def test_batches_equal_single_texts(vectors):
    """Padding inside a batch changes nothing (padded keys are masked, pooling skips them)."""
    encoder = default_text_encoder()
    single = np.concatenate([encoder.encode([t]) for t in TEXTS[:5]])
    assert _cosines(vectors[:5], single).min() >= 0.99999
    assert encoder.encode([]).shape == (0, 384)


def test_query_path_never_imports_torch():
    code = ("import sys; from models.text_encoder import default_text_encoder; "
            "default_text_encoder().encode(['a fox']); "
            "assert not {'torch', 'transformers', 'sentence_transformers'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_a_pipelines_clip_text_encoder_gives_its_pooled_output_as_the_pipeline_tokenises(tiny_clip_pipeline):
    import torch
    from transformers import AutoTokenizer, CLIPTextModel

    from models.text_encoder import load_text_encoder, text_encoder_for

    spec = f"clip:{tiny_clip_pipeline}"
    encoder = load_text_encoder(spec)
    texts = ["a red star", "neon " * 40, ""]  # the second is cut at the tokenizer's 16 tokens
    got = encoder.encode(texts, batch_size=2)
    assert encoder.dim == 32 and encoder.name == spec and got.shape == (3, 32) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_pipeline / "tokenizer")
    model = CLIPTextModel.from_pretrained(tiny_clip_pipeline / "text_encoder").eval()
    ids = tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(input_ids=ids).pooler_output, dim=-1).numpy()
    assert np.allclose(got, expected, atol=1e-5)
    assert text_encoder_for(spec) is text_encoder_for(spec)  # loaded once per process
    assert text_encoder_for("") is default_text_encoder()


@pytest.mark.slow
def test_matches_sentence_transformers_live(vectors):
    from models.text_encoder import TextEncoder

    reference = TextEncoder().encode(TEXTS)
    assert _cosines(vectors, reference).min() >= 0.9999
    assert _cosines(np.load(REFERENCE), reference).min() >= 0.99999


if __name__ == "__main__":
    from models.text_encoder import TextEncoder

    np.save(REFERENCE, TextEncoder().encode(TEXTS))
    print(f"wrote {REFERENCE}")
