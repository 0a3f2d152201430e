"""Test-wide settings: offline, few threads, a fresh registry per test, and a micro demo world
shared by the tests that need one (built once per run, by whichever pytest-xdist worker needs it
first; ``AUTOLORA_TEST_MICRO_WORLD`` may name an already built micro world folder,
``.../micro-seed0``, to skip the build)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # bin/test runs one worker per core: each on one BLAS/OpenMP thread (two busy workers with two
    # threads each oversubscribe the cores), set before torch or numpy is imported
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

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


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory) -> Path:
    given = os.environ.get("AUTOLORA_TEST_MICRO_WORLD")
    if given:
        return Path(given)
    from filelock import FileLock

    from pipelines.world.build import build_world

    # every xdist worker has a session of its own: the world goes into the run's shared temp folder,
    # built by the first worker that asks (the others wait on the lock, then reuse it)
    base = tmp_path_factory.getbasetemp()
    out = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "micro-world"
    with FileLock(f"{out}.lock"):
        build_world(out, size="micro", seed=0, progress=False)  # reused as it is once built
    return out / "micro-seed0"
