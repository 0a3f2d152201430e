"""Tiny FLUX base + LoRA training: real diffusers classes, save/load round trips (micro size, fast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from pipelines.world.themes import broad_mix, make_themes, theme_images
from pipelines.world.tiny_flux import MAX_SEQ_LEN, base_layer_shapes, build_tiny_flux
from pipelines.world.train_base import train_base
from pipelines.world.train_lora import save_diffusers_lora, train_lora

GEN = dict(height=32, width=32, num_inference_steps=3, max_sequence_length=MAX_SEQ_LEN, output_type="np")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _render(pipe: FluxPipeline, prompt: str = "a red circle on a striped background") -> np.ndarray:
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **GEN).images


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    images, captions, _ = broad_mix(48, seed=0)
    log: dict = {}
    out = train_base(images, captions, steps=30, vae_steps=10, batch_size=8, seed=0,
                     out_dir=tmp_path_factory.mktemp("base"), progress=False, log=log)
    return out, log


def _load(path: Path) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_build_is_a_small_deterministic_flux() -> None:
    a, b = build_tiny_flux(3), build_tiny_flux(3)
    shapes = base_layer_shapes(a)
    assert shapes["transformer_blocks.0.attn.to_q"] == (64, 64)
    assert shapes["single_transformer_blocks.1.proj_mlp"] == (256, 64)
    assert all(torch.equal(p, q) for p, q in zip(a.transformer.parameters(), b.transformer.parameters()))
    assert a.vae_scale_factor == 4 and a.transformer.config.in_channels == 4 * a.vae.config.latent_channels
    assert a.tokenizer.vocab_size == a.text_encoder.config.vocab_size == a.text_encoder_2.config.vocab_size
    emb, pooled, _ = a.encode_prompt(["a red circle", "a blue square"], max_sequence_length=MAX_SEQ_LEN)
    assert emb.shape == (2, MAX_SEQ_LEN, 64) and pooled.shape == (2, 64)


def test_training_lowers_loss_and_round_trips(trained: tuple[Path, dict]) -> None:
    out, log = trained
    losses = log["losses"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert np.mean(log["vae_losses"][-3:]) < np.mean(log["vae_losses"][:3])
    pipe = _load(out)
    image = _render(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_lora_trains_saves_and_loads(trained: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = trained
    pipe = _load(out)
    before = _render(pipe)
    shapes = base_layer_shapes(pipe)
    theme = make_themes(0, 4, 2)[0]
    images, captions = theme_images(theme, 12, seed=0)
    losses: list[float] = []
    layers = train_lora(pipe, images, captions, rank=4, target_modules=TARGETS, alpha=8.0, steps=6, seed=0,
                        lr=1e-2, losses=losses)
    assert len(losses) == 6
    assert set(layers) == {n for n in shapes if n.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v"}
                           or n.endswith("to_out.0")}
    for name, (a, b) in layers.items():
        d, k = shapes[name]
        assert a.shape == (4, k) and b.shape == (d, 4) and a.dtype == b.dtype == torch.float32
    # the adapter is gone: the base is unchanged and clean for the next LoRA
    assert base_layer_shapes(pipe) == shapes
    np.testing.assert_array_equal(_render(pipe), before)

    path = save_diffusers_lora(FluxPipeline, layers, tmp_path / "theme.safetensors")
    fresh = _load(out)
    fresh.load_lora_weights(path)
    after = _render(fresh)
    assert np.abs(after - before).max() > 1e-4
    name = "transformer_blocks.0.attn.to_q"
    mod = fresh.transformer.get_submodule(name)
    adapter = next(iter(mod.lora_A))
    delta = mod.scaling[adapter] * mod.lora_B[adapter].weight @ mod.lora_A[adapter].weight
    a, b = layers[name]
    torch.testing.assert_close(delta, b @ a)


def test_a_prompt_longer_than_the_trained_length_is_not_cut() -> None:
    """Trigger words put in front of a scene must not push the scene's last words out."""
    from pipelines.world.sampling import generate, sequence_length

    pipe = build_tiny_flux(3)
    pipe.set_progress_bar_config(disable=True)
    scene = "zqx-lora, prplstrp-lora, mgntcntr style, an image of a purple star on a striped background, "
    assert sequence_length(pipe, ["a red circle"]) == MAX_SEQ_LEN
    long = [scene + "flat style", scene + "glow style"]
    assert sequence_length(pipe, long) == max(len(pipe.tokenizer_2(p)["input_ids"]) for p in long) > MAX_SEQ_LEN
    first, second = (generate(pipe, [prompt], seed=0, steps=2) for prompt in long)
    assert not np.array_equal(first, second)  # the last word still counts


def test_training_captions_longer_than_the_trained_length_are_not_cut() -> None:
    """Gate training captions carry every active LoRA's trigger: their last words must still count,
    and captions that fit keep the base's trained length."""
    from pipelines.world.train_base import encode_captions

    pipe = build_tiny_flux(3)
    scene = "zqx-lora, prplstrp-lora, mgntcntr style, an image of a purple star on a striped background, "
    short = encode_captions(pipe, ["a red circle", "a blue square"])
    assert short.prompt_embeds.shape[1] == MAX_SEQ_LEN and short.text_ids.shape[0] == MAX_SEQ_LEN
    text = encode_captions(pipe, [scene + "flat style", scene + "glow style", "a red circle"])
    longest = max(len(pipe.tokenizer_2(scene + s)["input_ids"]) for s in ("flat style", "glow style"))
    assert text.prompt_embeds.shape[1] == text.text_ids.shape[0] == longest > MAX_SEQ_LEN
    assert not torch.equal(text.prompt_embeds[0], text.prompt_embeds[1])  # the last word still counts
