"""Base models a LoRA can target, described by the shapes of their linear layers.

A :class:`BaseModel` is just a name, an architecture family and the ``(out_features,
in_features)`` of every ``nn.Linear`` in its denoiser, keyed by diffusers module path. That is
all the registry needs to decide which base a canonical LoRA fits (:func:`match_base`).

Shapes cannot tell every base apart: FLUX.1-schnell is FLUX.1-dev without the guidance embedder,
so a LoRA that does not adapt those two layers fits both. Then a hint from metadata decides
(kohya ``ss_base_model_version``, ``modelspec.architecture``, a card's or Civitai's
``base_model``/``baseModel``), and without one FLUX.1-dev, the common case, wins.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where shapes are read: the names alone need none
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

# FLUX.1-schnell's: the same but without guidance distillation (black-forest-labs/FLUX.1-schnell).
FLUX1_SCHNELL_CONFIG: dict[str, object] = {**FLUX1_DEV_CONFIG, "guidance_embeds": False}

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

    def same_layers(self, other: BaseModel) -> bool:
        """Whether ``other`` has this base's architecture and layer shapes (names aside)."""
        return (self.architecture, self.layer_shapes) == (other.architecture, other.layer_shapes)

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
    def from_json(cls, s: str, name: str | None = None) -> BaseModel:
        """Inverse of :meth:`to_json`, renamed to ``name`` when given. ``ValueError`` where ``s`` is
        not a JSON object with a non-empty ``name`` and ``architecture`` and ``layer_shapes``
        (at least one module: ``[out_features, in_features]``, positive integers)."""
        try:
            data = json.loads(s)
        except json.JSONDecodeError as error:
            raise ValueError(f"not JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        name = name or data.get("name")
        shapes = data.get("layer_shapes")
        for key, value in (("name", name), ("architecture", data.get("architecture"))):
            if not (isinstance(value, str) and value.strip()):
                raise ValueError(f"no {key} (a non-empty string)")
        if not (isinstance(shapes, dict) and shapes and all(map(_is_shape, shapes.values()))):
            raise ValueError("layer_shapes must map at least one module to [out_features, in_features]")
        return cls(name=name, architecture=data["architecture"],
                   layer_shapes={k: (v[0], v[1]) for k, v in shapes.items()})

    @classmethod
    def from_flux_transformer(cls, name: str, transformer: torch.nn.Module) -> BaseModel:
        """Describe a (possibly meta-device) ``FluxTransformer2DModel`` by its linear layers (one
        without LoRA layers loaded: those would be described as the base's)."""
        import torch
        from diffusers import FluxTransformer2DModel

        if not isinstance(transformer, FluxTransformer2DModel):
            raise ValueError(f"{name}: expected a diffusers FluxTransformer2DModel, not {type(transformer).__name__}")
        if any(".lora_" in module_name or module_name.endswith(".base_layer")
               for module_name, _ in transformer.named_modules()):
            raise ValueError(f"{name}: the transformer has LoRA layers loaded; describe it before loading any "
                             "(or after pipe.unload_lora_weights())")
        shapes = {
            module_name: (module.out_features, module.in_features)
            for module_name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
        if not shapes:
            raise ValueError(f"{name}: the transformer has no nn.Linear layers")
        return cls(name=name, architecture="flux", layer_shapes=shapes)


def _is_shape(value: object) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value))


def flux_base_from_folder(folder: str | Path, name: str | None = None) -> BaseModel:
    """A diffusers FLUX pipeline folder's layer shapes, from its transformer config (no weights
    loaded); ``name`` defaults to the folder's parent's name."""
    import torch
    from diffusers import FluxTransformer2DModel

    folder = Path(folder)
    config = FluxTransformer2DModel.load_config(folder / "transformer")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    return BaseModel.from_flux_transformer(name or folder.resolve().parent.name, transformer)


def _flux_base(name: str, config: Mapping[str, object]) -> BaseModel:
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):  # no weights are allocated
        transformer = FluxTransformer2DModel(**config)
    return BaseModel.from_flux_transformer(name, transformer)


# The built-in bases' shapes as diffusers' FluxTransformer2DModel has them under each config (built on
# the meta device by write_builtin_bases, checked against that build by tests/registry/lora/
# test_base_models.py): building the model costs a new process ~5 s of imports (transformers, peft),
# which every one-file `autolora ingest` or `inspect` paid; reading the file takes ~2 ms.
BUILTIN_BASES_FILE = Path(__file__).with_name("builtin_bases.json")
BUILTIN_CONFIGS: dict[str, Mapping[str, object]] = {"FLUX.1-dev": FLUX1_DEV_CONFIG,
                                                     "FLUX.1-schnell": FLUX1_SCHNELL_CONFIG}


@functools.cache
def _builtin_file() -> dict:
    return json.loads(BUILTIN_BASES_FILE.read_text())["bases"]


@functools.cache
def _builtin(name: str) -> BaseModel:
    described = _builtin_file()[name]
    return BaseModel(name=name, architecture=described["architecture"], layer_shapes=described["layer_shapes"])


def write_builtin_bases(path: str | Path = BUILTIN_BASES_FILE) -> None:
    """Write :data:`BUILTIN_BASES_FILE` from diffusers' model under each built-in config (after a
    diffusers release changes the FLUX transformer's layers, which its test would say)."""
    import diffusers

    bases = {name: _flux_base(name, config) for name, config in BUILTIN_CONFIGS.items()}
    lines = ",\n".join(f'  "{name}": ' + json.dumps({"architecture": b.architecture, "layer_shapes": {
        k: list(v) for k, v in b.layer_shapes.items()}}) for name, b in bases.items())
    Path(path).write_text(f'{{"diffusers": "{diffusers.__version__}", "bases": {{\n{lines}\n}}}}\n')


def flux1_dev() -> BaseModel:
    """FLUX.1-dev's real layer shapes (diffusers' model under its config: see :data:`BUILTIN_BASES_FILE`)."""
    return _builtin("FLUX.1-dev")


def flux1_schnell() -> BaseModel:
    """FLUX.1-schnell's real layer shapes: FLUX.1-dev's less the guidance embedder."""
    return _builtin("FLUX.1-schnell")


BUILTIN_BASE_NAMES = tuple(BUILTIN_CONFIGS)  # builtin_bases()'s names, known without reading them


def builtin_bases() -> list[BaseModel]:
    """The bases every registry recognises without registration."""
    return [flux1_dev(), flux1_schnell()]


# How metadata names the built-in bases, besides their own names (compared after normalising:
# lower case, letters and digits only): Civitai's "Flux.1 D" / "Flux.1 S", kohya's "flux1-dev".
_ALIASES = {"FLUX.1-dev": ("flux1d",), "FLUX.1-schnell": ("flux1s",)}
# Bases chosen only when a hint names them or no other base fits: they share every shape with a
# more common base (FLUX.1-schnell's layers are all FLUX.1-dev's).
_ONLY_BY_HINT = frozenset({"FLUX.1-schnell"})
# Header keys whose text names the base a LoRA was trained on (kohya sd-scripts writes the
# checkpoint's file name, e.g. "flux1-schnell.safetensors", to ss_sd_model_name).
HINT_KEYS = ("modelspec.architecture", "ss_base_model_version", "ss_sd_model_name")


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def hint_from_metadata(metadata: Mapping[str, str]) -> str:
    """The base-model hint in a safetensors header's metadata (empty if none)."""
    return " | ".join(str(metadata[k]) for k in HINT_KEYS if metadata.get(k))


def _named_at(base: BaseModel, hint: str) -> int | None:
    """Where in ``hint`` (its ``|``-separated parts normalised) ``base`` is first named."""
    normalised = "|".join(_normalise(part) for part in hint.split("|"))
    names = {_normalise(base.name), *_ALIASES.get(base.name, ())} - {""}
    found = [i for n in names if (i := normalised.find(n)) >= 0]
    return min(found) if found else None


def match_base(
    layers: Mapping[str, tuple[int, int]], bases: Iterable[BaseModel], hint: str = ""
) -> BaseModel | None:
    """The base every LoRA layer fits (same name, same ``(d, k)``), or ``None``.

    Text-encoder layers (``text_encoder.*``) are ignored: base shapes describe the denoiser only.
    When several bases fit: the one ``hint`` names (metadata text such as "flux-1-schnell/lora",
    "Flux.1 S", "black-forest-labs/FLUX.1-dev"; ``|`` separates sources, the earliest named
    wins); else not a base that shapes cannot tell from a more common one (FLUX.1-schnell), then
    the one the LoRA covers most (largest fraction of its layers).
    """
    wanted = {k: tuple(v) for k, v in layers.items() if not k.startswith(TEXT_ENCODER_PREFIX)}
    if not wanted:
        return None
    best: tuple[tuple, BaseModel] | None = None
    for base in bases:
        if all(base.layer_shapes.get(name) == shape for name, shape in wanted.items()):
            at = _named_at(base, hint) if hint else None
            key = (at is not None, -(at or 0), base.name not in _ONLY_BY_HINT,
                   len(wanted) / len(base.layer_shapes))
            if best is None or key > best[0]:
                best = (key, base)
    return None if best is None else best[1]
