"""Probe directions for the LoRA-weight encoder taken from what the base model really feeds each layer.

A LoRA's ``B A`` only learns in the directions its layer's inputs take during training: the rest of
``A`` stays at its random initialisation, different for every seed. So ``B (A q)`` for a random
probe ``q`` mostly measures that noise, while for ``q`` in the span of the layer's real inputs it
measures what the LoRA learned. This module runs the base (e.g. rendering a few prompts) with forward
pre-hooks on the named linear layers and returns, per layer, ``P`` orthonormal directions that
dominate its inputs: the top left singular vectors of ``C Ω``, ``C = Σ xᵀx`` over every input row
and ``Ω`` a fixed random ``[k, 4P]`` matrix (a randomized range finder, so no ``k × k`` matrix is
held: FLUX.1-dev has 15,360-wide layers). Hand-written: no library probes LoRAs this way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

OVERSAMPLE = 4


@torch.no_grad()
def activation_probes(transformer: nn.Module, layer_names: Sequence[str], probes: int,
                      run: Callable[[], object], *, seed: int = 0) -> dict[str, Tensor]:
    """``{layer: Q [k, probes]}`` (orthonormal columns) for every named linear layer of
    ``transformer`` that received input while ``run()`` executed (e.g. rendered a few prompts)."""
    gen = torch.Generator().manual_seed(seed)
    sketches: dict[str, Tensor] = {}
    omegas: dict[str, Tensor] = {}
    hooks = []
    for name in layer_names:
        layer = transformer.get_submodule(name)
        omegas[name] = torch.randn(layer.in_features, OVERSAMPLE * probes, generator=gen, dtype=torch.float64)

        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            update = x.T @ (x @ omegas[name].to(x.device))
            sketches[name] = update if name not in sketches else sketches[name] + update

        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for handle in hooks:
            handle.remove()
    out = {}
    for name, sketch in sketches.items():
        u, _, _ = torch.linalg.svd(sketch.cpu(), full_matrices=False)
        out[name] = u[:, :probes].to(torch.float32).contiguous()
    return out
