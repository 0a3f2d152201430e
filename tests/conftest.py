"""Test-wide settings: offline, few threads, a fresh registry per test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def registry_dir(tmp_path):
    return tmp_path / "registry"


@pytest.fixture(scope="session")
def tiny_clip_pipeline(tmp_path_factory):
    """A folder laid out like a diffusers pipeline's text side (``tokenizer/`` + ``text_encoder/``)
    with a tiny random 32-wide CLIP text model over the bundled MiniLM vocabulary."""
    import torch
    from transformers import BertTokenizerFast, CLIPTextConfig, CLIPTextModel

    from models.text_encoder import default_model_path

    root = tmp_path_factory.mktemp("clip-pipeline")
    tokenizer = BertTokenizerFast.from_pretrained(default_model_path())
    tokenizer.model_max_length = 16
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, hidden_size=32,
        intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id))
    model.save_pretrained(root / "text_encoder")
    return root
