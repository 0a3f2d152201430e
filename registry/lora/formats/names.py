"""BFL <-> diffusers layer names, shared by every FLUX format.

Canonical layers are named by diffusers module paths (``transformer_blocks.3.attn.to_q``).
Original-FLUX ("BFL") checkpoints fuse some of them: ``double_blocks.N.img_attn.qkv`` is
``to_q|to_k|to_v`` stacked by rows, ``single_blocks.N.linear1`` is ``to_q|to_k|to_v|proj_mlp``.
The maps are written by hand from the two model definitions (no library exports them: diffusers
spells them out inside each converter); part sizes always come from the tensors' shapes, so the
same code serves FLUX.1 (width 3072) and tiny FLUX-architecture models.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

Tensor = torch.Tensor
Parts = tuple[str, ...]
BlockNames = Mapping[str, Mapping[str, Parts]]  # "double_blocks"|"single_blocks" -> {name: parts}

# Inside double_blocks.N -> inside transformer_blocks.N; fused layers list parts in row order.
BFL_DOUBLE: dict[str, Parts] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
# Inside single_blocks.N -> inside single_transformer_blocks.N.
BFL_SINGLE: dict[str, Parts] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
BFL_BLOCKS: BlockNames = {"double_blocks": BFL_DOUBLE, "single_blocks": BFL_SINGLE}
# Top-level layers.
BFL_TOP: dict[str, str] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
# BFL's final adaLN emits (shift, scale), diffusers' norm_out (scale, shift): B's row halves swap.
SWAPPED_HALVES = frozenset({"norm_out.linear"})
_SWAPPED_BFL = "final_layer_adaLN_modulation_1"
TEXT_ENCODER = "text_encoder."  # canonical prefix of CLIP-L layers

_ANY_BLOCK_RE = re.compile(
    r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)[._](\d+)[._](.+)$"
)
_TE_RE = re.compile(  # CLIP-L layer in any spelling, incl. diffusers' old "to_q_lora"
    r"layers[._](\d+)[._]"
    r"(?:self_attn[._](?:to_)?(q|k|v|out)(?:_proj|_lora)|mlp[._]fc([12]))(?:$|[._])"
)
_DIFFUSERS_KIND = {"double_blocks": "transformer_blocks",
                   "single_blocks": "single_transformer_blocks"}


def u(name: str) -> str:
    """Dots as underscores (kohya/OneTrainer spelling)."""
    return name.replace(".", "_")


class NameResolver:
    """Canonical layer name(s) of a module in any FLUX naming: BFL (dotted or kohya's
    underscores), diffusers (dotted or OneTrainer's underscores), plus extra names inside BFL
    blocks that some format uses (XLabs' ``processor.qkv_lora1``)."""

    def __init__(self, extra: BlockNames | None = None) -> None:
        def parts(table: Mapping[str, Parts]) -> dict[str, Parts]:
            return {u(p): (p,) for v in table.values() for p in v}

        self._tables: dict[str, tuple[str, dict[str, Parts]]] = {}
        for kind, table in BFL_BLOCKS.items():
            names = {u(k): v for k, v in table.items()}
            for k, v in (extra or {}).get(kind, {}).items():
                names[u(k)] = v
            self._tables[kind] = (_DIFFUSERS_KIND[kind], names)
            self._tables[_DIFFUSERS_KIND[kind]] = (_DIFFUSERS_KIND[kind], parts(table))
        self._top = {u(k): (v,) for k, v in BFL_TOP.items()}
        self._top |= {u(v): (v,) for v in BFL_TOP.values()}

    def layer(self, module: str) -> tuple[Parts, bool] | None:
        """Canonical layer name(s) for ``module`` and whether B's row halves swap.

        ``module`` is stripped of format prefixes already (``diffusion_model.``, ``lora_unet_``,
        ...). Fused BFL layers resolve to several parts, in row order. ``None`` if unknown.
        """
        m = _ANY_BLOCK_RE.match(module)
        if m:
            kind, index, rest = m.groups()
            diffusers_kind, table = self._tables[kind]
            found = table.get(u(rest))
            if found is None:
                return None
            return tuple(f"{diffusers_kind}.{index}.{p}" for p in found), False
        key = u(module)
        return (self._top[key], key == _SWAPPED_BFL) if key in self._top else None


def text_encoder_layer(module: str) -> str | None:
    """Canonical ``text_encoder.text_model.encoder.layers.N.…`` name of a CLIP-L LoRA module
    (already known to sit under a text-encoder prefix), or ``None``."""
    m = _TE_RE.search(module)
    if not m:
        return None
    index, attn, fc = m.groups()
    leaf = f"self_attn.{attn}_proj" if attn else f"mlp.fc{fc}"
    return f"{TEXT_ENCODER}text_model.encoder.layers.{index}.{leaf}"


def fused_part_sizes(n_parts: int, d: int, k: int) -> list[int]:
    """Row sizes of a fused BFL layer's parts: qkv is 3 x k, linear1 is 3 x k + the MLP width."""
    if n_parts == 1:
        return [d]
    if n_parts == 3 and d % 3 == 0:
        return [d // 3] * 3
    if n_parts == 4 and d > 3 * k:
        return [k, k, k, d - 3 * k]
    raise ValueError(f"cannot split a fused layer of output {d}, input {k} into {n_parts} parts")


def swap_halves(b: Tensor) -> Tensor:
    """Swap the two row halves (BFL ``(shift, scale)`` <-> diffusers ``(scale, shift)``)."""
    first, second = b.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
