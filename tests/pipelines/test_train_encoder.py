"""Contrastive training of the LoRA-weight encoder on a small synthetic task, real MiniLM text side."""

import time

import numpy as np
import pytest
import torch

from models.encoder import EncoderConfig, LayerSpec
from models.text_encoder import default_text_encoder
from pipelines.train_encoder import info_nce, infer_layer_specs, train_encoder

THEMES = ["watercolor painting", "pixel art", "neon cyberpunk city", "oil portrait",
          "pencil sketch", "origami paper craft", "anime cel shading", "low poly 3d render"]
D = 16
SPECS = ([LayerSpec(f"transformer_blocks.{i}.{m}", D, D) for i in range(2)
          for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")]
         + [LayerSpec(f"single_transformer_blocks.{i}.proj_mlp", 4 * D, D) for i in range(2)])


def theme_directions(seed=0):
    """Per theme and layer, a fixed (u, v): every LoRA of the theme has u v^T in its B A."""
    gen = torch.Generator().manual_seed(seed)
    return [{s.name: (torch.randn(s.d_out, generator=gen), torch.randn(s.d_in, generator=gen))
             for s in SPECS} for _ in THEMES]


def synthetic_lora(directions, gen):
    """Rank 2-6, random coverage (>= half the layers): the theme's direction plus random noise."""
    rank = int(torch.randint(2, 7, (), generator=gen))
    keep = torch.randperm(len(SPECS), generator=gen)[: int(torch.randint(5, len(SPECS) + 1, (), generator=gen))]
    lora = {}
    for i in keep.tolist():
        s = SPECS[i]
        u, v = directions[s.name]
        b = 0.5 * torch.randn(s.d_out, rank, generator=gen) / D ** 0.5
        a = 0.5 * torch.randn(rank, s.d_in, generator=gen) / D ** 0.5
        b[:, 0] += u / D ** 0.5
        a[0] += v / D ** 0.5
        lora[s.name] = (a, b)
    return lora


def test_info_nce_masks_same_group_pairs_out_of_the_denominator():
    e = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    t = e.clone()
    t[1] = e[0]  # item 1's text is item 0's: same theme
    scale = torch.tensor(10.0)
    plain = info_nce(e, t, scale)
    grouped = info_nce(e, t, scale, torch.tensor([0, 0, 1, 2]))
    assert grouped < plain
    logits = scale * e @ t.T  # by hand: row 0 without column 1, column 0 without row 1, ...
    masked = logits.clone()
    masked[0, 1] = masked[1, 0] = float("-inf")
    target = torch.arange(4)
    expected = 0.5 * (torch.nn.functional.cross_entropy(masked, target)
                      + torch.nn.functional.cross_entropy(masked.T, target))
    torch.testing.assert_close(grouped, expected)


def test_infer_layer_specs_orders_blocks_naturally():
    lora = {f"transformer_blocks.{i}.attn.to_q": (torch.zeros(1, 3), torch.zeros(5, 1)) for i in (10, 2)}
    assert [s.name for s in infer_layer_specs([lora])] == [
        "transformer_blocks.2.attn.to_q", "transformer_blocks.10.attn.to_q"]
    assert infer_layer_specs([lora])[0].d_out == 5


def test_training_retrieves_held_out_loras_of_the_training_themes():
    directions = theme_directions()
    gen = torch.Generator().manual_seed(1)
    train, train_groups, held_out, held_theme = [], [], [], []
    for g, theme in enumerate(THEMES):
        for j in range(8):
            lora = synthetic_lora(directions[g], gen)
            if j < 6:
                train.append((lora, [theme, f"a {theme} style LoRA", f"an image in {theme} style"]))
                train_groups.append(g)
            else:
                held_out.append(lora)
                held_theme.append(g)
    text = default_text_encoder()
    config = EncoderConfig.ours(width=64, depth=2, heads=4, probe_dim=16)
    began = time.perf_counter()
    encoder, losses = train_encoder(train, text, config, steps=150, batch_size=16, lr=2e-3, seed=0,
                                    groups=train_groups, layers=SPECS)
    elapsed = time.perf_counter() - began
    assert len(losses) == 150 and np.mean(losses[-20:]) < 0.6 * np.mean(losses[:10])
    queries = torch.from_numpy(text.encode([f"a {t} style LoRA" for t in THEMES]))
    scores = encoder.embed(held_out) @ queries.T
    top1 = (scores.argmax(1) == torch.tensor(held_theme)).float().mean().item()
    assert top1 >= 0.6, f"held-out top-1 {top1:.2f} (random: {1 / len(THEMES):.2f})"
    assert elapsed < 120, f"training took {elapsed:.0f}s"
    again, losses2 = train_encoder(train[:8], text, config, steps=3, batch_size=4, seed=5,
                                   groups=train_groups[:8], layers=SPECS)
    _, losses3 = train_encoder(train[:8], text, config, steps=3, batch_size=4, seed=5,
                               groups=train_groups[:8], layers=SPECS)
    assert losses2 == losses3  # deterministic from the seed


class NarrowText:
    """MiniLM through a fixed random map to 48 dimensions: a text encoder of another width."""

    dim = 48

    def __init__(self):
        self.map = np.random.default_rng(0).standard_normal((384, self.dim)).astype(np.float32)

    def encode(self, texts):
        v = default_text_encoder().encode(list(texts)) @ self.map
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_a_text_encoder_of_another_width_trains_through_a_learned_map():
    directions = theme_directions()
    gen = torch.Generator().manual_seed(1)
    train, held_out, held_theme = [], [], []
    for g, theme in enumerate(THEMES):
        for j in range(8):
            lora = synthetic_lora(directions[g], gen)
            if j < 6:
                train.append((lora, [theme, f"a {theme} style LoRA", f"an image in {theme} style"]))
            else:
                held_out.append(lora)
                held_theme.append(g)
    text = NarrowText()
    with pytest.raises(ValueError, match="text_dim"):
        train_encoder(train, text, EncoderConfig.ours(width=64, depth=0, pool="mean"), steps=1, layers=SPECS)
    config = EncoderConfig.ours(width=64, depth=0, pool="mean", probe_dim=16, text_dim=text.dim)
    encoder, losses = train_encoder(train, text, config, steps=150, batch_size=16, lr=1e-2, seed=0, layers=SPECS)
    assert encoder.text_proj is not None and encoder.text_proj.weight.shape == (384, 48)
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:10])
    with torch.no_grad():
        queries = encoder.project_text(torch.from_numpy(text.encode([f"a {t} style LoRA" for t in THEMES])))
        top1 = ((encoder.embed(held_out) @ queries.T).argmax(1) == torch.tensor(held_theme)).float().mean().item()
    assert torch.allclose(queries.norm(dim=1), torch.ones(len(THEMES)), atol=1e-5)
    assert top1 >= 0.6, f"held-out top-1 {top1:.2f} (random: {1 / len(THEMES):.2f})"


def test_paper_config_trains_without_dropping_layers():
    directions = theme_directions()
    gen = torch.Generator().manual_seed(2)
    items = []
    for g, theme in enumerate(THEMES[:4]):
        lora = synthetic_lora(directions[g], gen)
        full = {s.name: lora.get(s.name, (torch.randn(2, s.d_in, generator=gen), torch.randn(s.d_out, 2, generator=gen)))
                for s in SPECS}
        items.append((full, [theme]))
    config = EncoderConfig.paper(width=32, probe_dim=32, heads=4)
    encoder, losses = train_encoder(items, default_text_encoder(), config, steps=3, batch_size=4, layers=SPECS)
    assert len(losses) == 3 and all(np.isfinite(losses))
    with pytest.raises(ValueError, match="require_all_layers"):
        encoder.embed([{k: v for k, v in items[0][0].items() if "to_q" not in k}])


def test_views_are_independent_augmentations_of_each_lora_paired_with_its_one_text(monkeypatch):
    """``views=3``: the encoder sees 3 x batch LoRAs per step; with every augmentation off the 3 views
    are the same LoRA, so training is 1 view's (the loss is the views' mean); with them on, it is not."""
    from models.encoder import LoRAWeightEncoder

    directions = theme_directions()
    gen = torch.Generator().manual_seed(3)
    items = [(synthetic_lora(directions[g], gen), [theme]) for g, theme in enumerate(THEMES)]
    config = EncoderConfig.ours(width=32, depth=0, pool="mean", probe_dim=8)
    seen, forward = [], LoRAWeightEncoder.forward
    monkeypatch.setattr(LoRAWeightEncoder, "forward", lambda self, loras, *a, **k: (
        seen.append(len(loras)), forward(self, loras, *a, **k))[1])
    off = {"p_drop": 0.0, "p_truncate": 0.0, "scale_range": (1.0, 1.0)}
    run = dict(steps=4, batch_size=4, seed=0, layers=SPECS)
    _, one = train_encoder(items, default_text_encoder(), config, augment_options=off, **run)
    assert seen == [4] * 4
    seen.clear()
    _, three_same = train_encoder(items, default_text_encoder(), config, augment_options=off, views=3, **run)
    assert seen == [12] * 4
    np.testing.assert_allclose(three_same, one, rtol=1e-5)
    _, three = train_encoder(items, default_text_encoder(), config, views=3, **run)
    _, one_augmented = train_encoder(items, default_text_encoder(), config, **run)
    assert three[0] != one_augmented[0]  # the same first batch and texts, other augmentations
    with pytest.raises(ValueError, match="views"):
        train_encoder(items, default_text_encoder(), config, views=0, **run)
