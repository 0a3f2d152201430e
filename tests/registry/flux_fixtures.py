"""FLUX LoRA fixtures with FLUX.1-dev's real layer names and shapes (width 3072, MLP 12288).

Values are small random numbers; the point is names, shapes, coverage and ranks. Full coverage
(every linear layer of the 19 double and 38 single blocks, 494 layers) is ~43 MB at rank 4 in
float16, so tests use that; partial LoRAs (a few blocks, optionally attention only) are float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from registry.lora.base_models import BaseModel, flux1_dev
from registry.lora.formats import to_format

Layers = dict[str, tuple[torch.Tensor, torch.Tensor]]

TINY_FLUX_CONFIG = dict(  # a FLUX-architecture transformer of width 32 (4 heads x 8)
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def random_layers(
    shapes: Mapping[str, tuple[int, int]],
    rank: int | Mapping[str, int],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Layers:
    """Random ``(A [r,k], B [d,r])`` per layer with ``ΔW`` entries around 1e-4."""
    gen = torch.Generator().manual_seed(seed)
    layers: Layers = {}
    for name in sorted(shapes):
        d, k = shapes[name]
        r = rank if isinstance(rank, int) else rank[name]
        a = torch.randn(r, k, generator=gen) / k**0.5 * 0.1
        b = torch.randn(d, r, generator=gen) * 0.01
        layers[name] = (a.to(dtype), b.to(dtype))
    return layers


def block_layer_names(base: BaseModel | None = None) -> list[str]:
    """Every linear layer inside the double and single blocks (494 for FLUX.1-dev)."""
    base = base or flux1_dev()
    return [n for n in base.layer_shapes if n.startswith(BLOCKS)]


def partial_names(
    double: Iterable[int] = (0, 7),
    single: Iterable[int] = (3,),
    *,
    attention_only: bool = False,
    base: BaseModel | None = None,
) -> list[str]:
    """Layers of a few blocks; with ``attention_only`` just their ``attn.*`` projections."""
    base = base or flux1_dev()
    prefixes = tuple(f"transformer_blocks.{i}." for i in double) + tuple(
        f"single_transformer_blocks.{i}." for i in single)
    names = [n for n in base.layer_shapes if n.startswith(prefixes)]
    if attention_only:
        names = [n for n in names if n.split(".", 2)[2].startswith("attn.")]
    return names


def flux_lora(
    names: Iterable[str],
    rank: int = 4,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    base: BaseModel | None = None,
) -> Layers:
    """A random LoRA on ``names`` with the base's real shapes."""
    base = base or flux1_dev()
    return random_layers({n: base.layer_shapes[n] for n in names}, rank, seed=seed, dtype=dtype)


def full_coverage_lora(
    rank: int = 4, *, seed: int = 0, dtype: torch.dtype = torch.float16
) -> Layers:
    """All 494 block layers of FLUX.1-dev (rank 4 float16: ~43 MB)."""
    return flux_lora(block_layer_names(), rank, seed=seed, dtype=dtype)


def top_level_names(base: BaseModel | None = None) -> list[str]:
    """The linear layers outside the blocks (embedders, final norm and projection)."""
    base = base or flux1_dev()
    return [n for n in base.layer_shapes if not n.startswith(BLOCKS)]


def fal_kontext_state(layers: Layers) -> dict[str, torch.Tensor]:
    """fal/Kontext layout: BFL names with PEFT suffixes under ``base_model.model.``."""
    state = to_format(layers, "bfl_peft")
    return {k.replace("diffusion_model.", "base_model.model.", 1): v for k, v in state.items()}


def bfl_control_state(layers: Layers, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """BFL Control-LoRA layout: bare BFL names, PEFT suffixes, plus the q/k norm scales it ships."""
    state = to_format(layers, "bfl_peft")
    state = {k.removeprefix("diffusion_model."): v for k, v in state.items()}
    gen = torch.Generator().manual_seed(seed)
    dtype = next(iter(state.values())).dtype
    norms = [f"double_blocks.{i}.{s}.norm" for i in range(19) for s in ("img_attn", "txt_attn")]
    norms += [f"single_blocks.{i}.norm" for i in range(38)]
    for norm in norms:
        for which in ("query_norm", "key_norm"):
            scale = 1 + 0.01 * torch.randn(128, generator=gen)
            state[f"{norm}.{which}.scale"] = scale.to(dtype)
    return state


def control_lora_layers(
    rank: int = 2, *, seed: int = 0, dtype: torch.dtype = torch.float16
) -> Layers:
    """Every linear layer; ``x_embedder`` takes 128 channels (image + control latents) as in
    real Control LoRAs."""
    base = flux1_dev()
    shapes = dict(base.layer_shapes)
    shapes["x_embedder"] = (shapes["x_embedder"][0], 128)
    return random_layers(shapes, rank, seed=seed, dtype=dtype)


def tiny_flux_base() -> BaseModel:
    """Layer shapes of a tiny FLUX-architecture transformer (built on the meta device)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**TINY_FLUX_CONFIG)
    return BaseModel.from_flux_transformer("tiny-flux", model)


def delta(layer: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``ΔW = B @ A`` in float64 (only for small layers or a few big ones)."""
    a, b = layer
    return b.double() @ a.double()


def max_delta_error(expected: Layers, got: Layers, probes: int = 3) -> float:
    """Largest relative error of ``ΔW x`` for random probes over all layers (keys must match)."""
    assert sorted(expected) == sorted(got), sorted(set(expected) ^ set(got))[:5]
    gen = torch.Generator().manual_seed(123)
    worst = 0.0
    for name, (a, b) in expected.items():
        x = torch.randn(a.shape[1], probes, generator=gen, dtype=torch.float64)
        want = b.double() @ (a.double() @ x)
        a2, b2 = got[name]
        have = b2.double() @ (a2.double() @ x)
        worst = max(worst, float((want - have).norm() / want.norm()))
    return worst
