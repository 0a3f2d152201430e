"""Base models a LoRA can target, described by the shapes of their linear layers.

A :class:`BaseModel` is just a name, an architecture family and the ``(out_features,
in_features)`` of every ``nn.Linear`` in its denoiser, keyed by diffusers module path. That is
all the registry needs to decide which base a canonical LoRA fits (:func:`match_base`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

# FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json).
FLUX1_DEV_CONFIG: dict[str, object] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

# Layers a LoRA may carry that live outside the denoiser; base shapes do not cover them.
TEXT_ENCODER_PREFIX = "text_encoder."


@dataclass(frozen=True)
class BaseModel:
    """A base model as seen by LoRA matching: its linear layers and their ``(d, k)`` shapes."""

    name: str
    architecture: str
    layer_shapes: Mapping[str, tuple[int, int]]

    def __post_init__(self) -> None:
        shapes = {str(k): (int(v[0]), int(v[1])) for k, v in self.layer_shapes.items()}
        object.__setattr__(self, "layer_shapes", dict(sorted(shapes.items())))

    def __hash__(self) -> int:  # the shapes dict is not hashable; name + family + size is enough
        return hash((self.name, self.architecture, len(self.layer_shapes)))

    def to_json(self) -> str:
        """Serialise to a JSON string (shapes as ``[d, k]`` lists)."""
        return json.dumps(
            {
                "name": self.name,
                "architecture": self.architecture,
                "layer_shapes": {k: list(v) for k, v in self.layer_shapes.items()},
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, s: str) -> BaseModel:
        """Inverse of :meth:`to_json`."""
        data = json.loads(s)
        shapes = {k: (int(v[0]), int(v[1])) for k, v in data["layer_shapes"].items()}
        return cls(name=data["name"], architecture=data["architecture"], layer_shapes=shapes)

    @classmethod
    def from_flux_transformer(cls, name: str, transformer: torch.nn.Module) -> BaseModel:
        """Describe a (possibly meta-device) ``FluxTransformer2DModel`` by its linear layers."""
        shapes = {
            module_name: (module.out_features, module.in_features)
            for module_name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
        if not shapes:
            raise ValueError(f"{name}: the transformer has no nn.Linear layers")
        return cls(name=name, architecture="flux", layer_shapes=shapes)


def flux_base_from_folder(folder: str | Path, name: str | None = None) -> BaseModel:
    """A diffusers FLUX pipeline folder's layer shapes, from its transformer config (no weights
    loaded); ``name`` defaults to the folder's parent's name."""
    from diffusers import FluxTransformer2DModel

    folder = Path(folder)
    config = FluxTransformer2DModel.load_config(folder / "transformer")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    return BaseModel.from_flux_transformer(name or folder.resolve().parent.name, transformer)


@functools.cache
def flux1_dev() -> BaseModel:
    """FLUX.1-dev's real layer shapes, read off the diffusers model built on the meta device."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):  # no weights are allocated
        transformer = FluxTransformer2DModel(**FLUX1_DEV_CONFIG)
    return BaseModel.from_flux_transformer("FLUX.1-dev", transformer)


def builtin_bases() -> list[BaseModel]:
    """The bases every registry recognises without registration."""
    return [flux1_dev()]


def match_base(
    layers: Mapping[str, tuple[int, int]], bases: Iterable[BaseModel]
) -> BaseModel | None:
    """The base every LoRA layer fits (same name, same ``(d, k)``), or ``None``.

    Text-encoder layers (``text_encoder.*``) are ignored: base shapes describe the denoiser only.
    When several bases fit, the one the LoRA covers most (largest fraction of its layers) wins.
    """
    wanted = {k: tuple(v) for k, v in layers.items() if not k.startswith(TEXT_ENCODER_PREFIX)}
    if not wanted:
        return None
    best: tuple[float, BaseModel] | None = None
    for base in bases:
        if all(base.layer_shapes.get(name) == shape for name, shape in wanted.items()):
            coverage = len(wanted) / len(base.layer_shapes)
            if best is None or coverage > best[0]:
                best = (coverage, base)
    return None if best is None else best[1]
