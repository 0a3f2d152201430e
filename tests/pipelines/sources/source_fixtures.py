"""Small valid FLUX.1-dev LoRAs (real layer names and shapes) and a tiny PNG, as bytes with their
sha256, for the source tests (a module of its own: ``from conftest import`` finds whichever
conftest was imported first when several test folders run together)."""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "registry"))
from flux_fixtures import flux_lora, partial_names  # noqa: E402

from registry.lora.formats import save_lora  # noqa: E402


def lora_bytes(tmp_path: Path, seed: int) -> bytes:
    """A diffusers-format FLUX LoRA on two attention blocks, rank 2 (~0.2 MB)."""
    path = tmp_path / f"make-{seed}.safetensors"
    names = partial_names(double=(seed % 19,), single=(), attention_only=True)
    save_lora(path, flux_lora(names, rank=2, seed=seed), "diffusers")
    data = path.read_bytes()
    path.unlink()
    return data


def png_bytes(colour: int = 128) -> bytes:
    """A 4x4 grey PNG."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (4, 4), colour).save(out, format="PNG")
    return out.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
