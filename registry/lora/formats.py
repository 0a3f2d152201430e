"""FLUX LoRA file formats: how keys are spelled in each format, and writers for them.

Canonical layers are named by diffusers module paths (``transformer_blocks.3.attn.to_q``).
Original-FLUX ("BFL") checkpoints fuse some of them: ``double_blocks.N.img_attn.qkv`` is
``to_q|to_k|to_v`` stacked by rows, ``single_blocks.N.linear1`` is ``to_q|to_k|to_v|proj_mlp``.
The maps below are written from the two model definitions; part sizes always come from the
tensors' shapes, so the same code serves FLUX.1 (width 3072) and tiny FLUX-architecture models.

Writers (:func:`to_format`) are exact inverses of :func:`registry.lora.canonical.canonicalise`: a fused
BFL layer built from parts with their own factors gets ``A = [A_q; A_k; A_v]`` and a
block-diagonal ``B`` (rank = sum of part ranks), so ``B A`` stacks the parts' updates exactly;
missing parts are zero blocks (the reader drops all-zero rank components and layers again).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping

import torch
from safetensors.torch import save_file

Tensor = torch.Tensor
LayerFactors = Mapping[str, tuple[Tensor, Tensor]]

FORMATS = ("diffusers", "kohya", "comfyui", "xlabs", "onetrainer", "bfl_peft")

# --- BFL <-> diffusers names ----------------------------------------------------------------
# Inside double_blocks.N -> inside transformer_blocks.N; fused layers list parts in row order.
BFL_DOUBLE: dict[str, tuple[str, ...]] = {
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
BFL_SINGLE: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
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
TEXT_ENCODER = "text_encoder."

_DOUBLE_RE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_SINGLE_RE = re.compile(r"^single_transformer_blocks\.(\d+)\.(.+)$")
_ANY_BLOCK_RE = re.compile(
    r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)[._](\d+)[._](.+)$"
)
_TE_RE = re.compile(  # CLIP-L layer in any spelling, incl. diffusers' old "to_q_lora"
    r"layers[._](\d+)[._]"
    r"(?:self_attn[._](?:to_)?(q|k|v|out)(?:_proj|_lora)|mlp[._]fc([12]))(?:$|[._])"
)
_TE_PREFIXES = ("text_encoder.", "lora_te_", "lora_te1_", "text_encoders.clip_l.transformer.")


def _u(name: str) -> str:
    return name.replace(".", "_")


def _block_tables() -> dict[str, tuple[str, dict[str, tuple[str, ...]]]]:
    """Block kind -> (diffusers block kind, {suffix, dots as "_" -> canonical part suffixes})."""
    def parts(table: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        return {_u(p): (p,) for v in table.values() for p in v}

    return {
        "double_blocks": ("transformer_blocks", {_u(k): v for k, v in BFL_DOUBLE.items()}),
        "single_blocks": ("single_transformer_blocks", {_u(k): v for k, v in BFL_SINGLE.items()}),
        "transformer_blocks": ("transformer_blocks", parts(BFL_DOUBLE)),
        "single_transformer_blocks": ("single_transformer_blocks", parts(BFL_SINGLE)),
    }


_BLOCK_TABLES = _block_tables()
_TOP_U = {_u(k): (v,) for k, v in BFL_TOP.items()} | {_u(v): (v,) for v in BFL_TOP.values()}


def resolve_layer_name(module: str) -> tuple[tuple[str, ...], bool] | None:
    """Canonical layer name(s) for a module in any FLUX naming, and whether B's halves swap.

    ``module`` is stripped of format prefixes already (``diffusion_model.``, ``lora_unet_``, ...).
    Accepts BFL names (``double_blocks.0.img_attn.qkv``, kohya's ``double_blocks_0_img_attn_qkv``)
    and diffusers names (dotted, or OneTrainer's ``transformer_blocks_0_attn_to_q``). Fused BFL
    layers resolve to several parts, in row order. ``None`` if not recognised.
    """
    m = _ANY_BLOCK_RE.match(module)
    if m:
        kind, index, rest = m.groups()
        diffusers_kind, table = _BLOCK_TABLES[kind]
        parts = table.get(_u(rest))
        if parts is None:
            return None
        return tuple(f"{diffusers_kind}.{index}.{p}" for p in parts), False
    key = _u(module)
    return (_TOP_U[key], key == _SWAPPED_BFL) if key in _TOP_U else None


def resolve_text_encoder_name(module: str) -> str | None:
    """Canonical ``text_encoder.text_model.encoder.layers.N.…`` name of a CLIP-L LoRA module."""
    m = _TE_RE.search(module) if module.startswith(_TE_PREFIXES) else None
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


# --- reading keys ---------------------------------------------------------------------------
_ROLES = (  # longest suffix first
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".down.weight", "down"), (".up.weight", "up"),
    (".alpha", "alpha"),
)
_BFL_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "double_blocks.", "single_blocks.")


def split_key(key: str) -> tuple[str, str] | None:
    """``(module, role)`` of a LoRA key, role ``down`` (A), ``up`` (B) or ``alpha``; else None."""
    return next(((key[: -len(s)], role) for s, role in _ROLES if key.endswith(s)), None)


def detect_format(keys: Iterable[str]) -> str:
    """Name a file's format from its keys (a label only; conversion does not depend on it)."""
    ks = list(keys)

    def any_key(test: Callable[[str], bool]) -> bool:
        return any(test(k) for k in ks)

    if any_key(lambda k: "query_norm.scale" in k):
        return "bfl_control"
    if any_key(lambda k: ".processor." in k):
        return "xlabs"
    if any_key(lambda k: k.startswith("base_model.model.")):
        return "fal_kontext"
    if any_key(lambda k: k.startswith("lora_transformer_")):
        return "onetrainer"
    if any_key(lambda k: "lora_down" in k or "lora_up" in k):
        return "comfyui" if any_key(lambda k: k.startswith("diffusion_model.")) else "kohya"
    if any_key(lambda k: k.startswith(_BFL_PREFIXES)):
        return "bfl_peft"
    if any_key(lambda k: k.startswith(("transformer.", "text_encoder."))):
        return "diffusers"
    return "peft"


# --- writers --------------------------------------------------------------------------------
Group = tuple[str, int, tuple[str, ...]]  # (module in the file, part index, canonical part names)


def _inverse(table: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, int, tuple[str, ...]]]:
    return {p: (module, i, parts) for module, parts in table.items() for i, p in enumerate(parts)}


_XLABS_DOUBLE = {"processor.qkv_lora1": BFL_DOUBLE["img_attn.qkv"],
                 "processor.proj_lora1": BFL_DOUBLE["img_attn.proj"],
                 "processor.qkv_lora2": BFL_DOUBLE["txt_attn.qkv"],
                 "processor.proj_lora2": BFL_DOUBLE["txt_attn.proj"]}
_XLABS_SINGLE = {"processor.qkv_lora": BFL_SINGLE["linear1"][:3]}  # XLabs adapts q/k/v only
_BFL_INVERSE = ((_DOUBLE_RE, _inverse(BFL_DOUBLE)), (_SINGLE_RE, _inverse(BFL_SINGLE)))
_XLABS_INVERSE = ((_DOUBLE_RE, _inverse(_XLABS_DOUBLE)), (_SINGLE_RE, _inverse(_XLABS_SINGLE)))
_TOP_INVERSE = {v: k for k, v in BFL_TOP.items()}


def _group_of(name: str, inverses: tuple, top: bool) -> Group | None:
    """The file module (BFL or XLabs naming) that canonical layer ``name`` is part of."""
    kinds = ("double_blocks", "single_blocks")
    for (regex, inverse), file_kind in zip(inverses, kinds, strict=True):
        m = regex.match(name)
        if m and m.group(2) in inverse:
            module, i, parts = inverse[m.group(2)]
            block = name[: m.end(1)]
            return f"{file_kind}.{m.group(1)}.{module}", i, tuple(f"{block}.{p}" for p in parts)
    if top and name in _TOP_INVERSE:
        return _TOP_INVERSE[name], 0, (name,)
    return None


def _mlp_width(layers: LayerFactors, k: int) -> int:
    """The single blocks' MLP width, read off any layer showing it (diffusers FLUX: 4 x width)."""
    for name, (a, b) in layers.items():
        if _SINGLE_RE.match(name) and name.endswith(".proj_mlp"):
            return int(b.shape[0])
        if _SINGLE_RE.match(name) and name.endswith(".proj_out"):
            return int(a.shape[1]) - int(b.shape[0])
    return 4 * k


def _fuse(layers: LayerFactors, fmt: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Group canonical layers into the (possibly fused) modules of a BFL- or XLabs-named file."""
    groups: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    part_names: dict[str, tuple[str, ...]] = {}
    xlabs = fmt == "xlabs"
    for name, (a, b) in layers.items():
        group = _group_of(name, _XLABS_INVERSE if xlabs else _BFL_INVERSE, top=not xlabs)
        if group is None:
            raise ValueError(f"layer {name!r} cannot be written in the {fmt} format")
        module, index, parts = group
        groups.setdefault(module, {})[index] = (a, b)
        part_names[module] = parts
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for module, members in groups.items():
        parts, order = part_names[module], sorted(members)
        if len(parts) == 1:
            a, b = members[0]
            out[module] = (a, swap_halves(b) if parts[0] in SWAPPED_HALVES else b)
            continue
        downs = [members[i][0] for i in order]
        if len(order) == len(parts) and all(torch.equal(downs[0], d) for d in downs[1:]):
            out[module] = (downs[0], torch.cat([members[i][1] for i in order]))  # shared A
            continue
        k = int(downs[0].shape[1])
        missing = {i: _mlp_width(layers, k) if parts[i].endswith("proj_mlp") else k
                   for i in range(len(parts)) if i not in members}
        sizes = [int(members[i][1].shape[0]) if i in members else missing[i]
                 for i in range(len(parts))]
        down = torch.cat(downs)
        up = torch.zeros(sum(sizes), down.shape[0], dtype=members[order[0]][1].dtype)
        col = 0
        for i in order:  # block-diagonal B: part i's rows use only part i's rank columns
            b = members[i][1]
            row = sum(sizes[:i])
            up[row : row + b.shape[0], col : col + b.shape[1]] = b
            col += b.shape[1]
        out[module] = (down, up)
    return out


_SUFFIXES = {
    "diffusers": (".lora_A.weight", ".lora_B.weight"),
    "bfl_peft": (".lora_A.weight", ".lora_B.weight"),
    "xlabs": (".down.weight", ".up.weight"),
    "kohya": (".lora_down.weight", ".lora_up.weight"),
    "comfyui": (".lora_down.weight", ".lora_up.weight"),
    "onetrainer": (".lora_down.weight", ".lora_up.weight"),
}
_WITH_ALPHA = {"kohya", "comfyui", "onetrainer"}  # always write `.alpha`; diffusers when asked


def _file_key(fmt: str, module: str) -> str:
    """The key prefix under which ``fmt`` stores ``module`` (a canonical or BFL name)."""
    if module.startswith(TEXT_ENCODER):
        rest = module[len(TEXT_ENCODER):]
        te = {"diffusers": module, "kohya": "lora_te1_" + _u(rest),
              "onetrainer": "lora_te1_" + _u(rest),
              "comfyui": "text_encoders.clip_l.transformer." + rest}
        if fmt not in te:
            raise ValueError(f"text-encoder layer {module!r} cannot be written in the {fmt} format")
        return te[fmt]
    return {"diffusers": "transformer." + module, "onetrainer": "lora_transformer_" + _u(module),
            "kohya": "lora_unet_" + _u(module), "comfyui": "diffusion_model." + module,
            "bfl_peft": "diffusion_model." + module, "xlabs": module}[fmt]


def to_format(
    lora_layers: LayerFactors, fmt: str, *, alpha: float | None = None
) -> dict[str, Tensor]:
    """Write canonical layers (``name -> (A [r,k], B [d,r])``, ``ΔW = B A``) in format ``fmt``.

    ``alpha``: the ``.alpha`` to store (kohya-style scale ``alpha / rank``; ``B`` is divided by
    that scale so the file still means ``ΔW``). Defaults to the rank (scale 1) where a format
    always carries alphas; kohya, comfyui, onetrainer and diffusers can store one. Partial
    coverage is fine; layers a format cannot name raise ``ValueError``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if alpha is not None and fmt not in _WITH_ALPHA | {"diffusers"}:
        raise ValueError(f"the {fmt} format has no alpha")
    modules = dict(lora_layers)
    if fmt in ("kohya", "comfyui", "bfl_peft", "xlabs"):
        te = {n: f for n, f in lora_layers.items() if n.startswith(TEXT_ENCODER)}
        modules = _fuse({n: f for n, f in lora_layers.items() if n not in te}, fmt) | te
    down_suffix, up_suffix = _SUFFIXES[fmt]
    state: dict[str, Tensor] = {}
    for module, (a, b) in modules.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{module}: A {tuple(a.shape)} and B {tuple(b.shape)} are no LoRA")
        key = _file_key(fmt, module)
        if fmt in _WITH_ALPHA or alpha is not None:
            value = float(alpha) if alpha is not None else float(a.shape[0])
            b = b * (a.shape[0] / value)
            state[key + ".alpha"] = torch.tensor(value, dtype=torch.float32)
        state[key + down_suffix] = a.contiguous()
        state[key + up_suffix] = b.contiguous()
    return state


def save_lora(
    path: str | os.PathLike[str],
    lora_layers: LayerFactors,
    fmt: str,
    *,
    metadata: dict[str, str] | None = None,
    alpha: float | None = None,
) -> None:
    """Write canonical layers to a ``.safetensors`` file in format ``fmt`` (see ``to_format``)."""
    state = to_format(lora_layers, fmt, alpha=alpha)
    seen: set[int] = set()
    for key, tensor in state.items():  # safetensors refuses tensors that share storage
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            state[key] = tensor.clone()
        seen.add(ptr)
    save_file(state, os.fspath(path), metadata=metadata)
