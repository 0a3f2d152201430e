"""FLUX LoRA file formats behind one small registry: detect, read (key spellings), write.

One module per format (``diffusers``, ``kohya``, ``comfyui``, ``xlabs``, ``onetrainer``,
``bfl_peft``; read only: ``fal_kontext``, ``bfl_control``, ``peft``), each declaring a
:class:`~registry.lora.formats.spec.Format`; BFL <-> diffusers names shared by all of them are
in :mod:`registry.lora.formats.names`. This module keeps the formats in detection order and
composes their spellings into one reader: :func:`split_key` (suffix -> role) and
:func:`module_layers` (module -> canonical layer names) understand every format's spelling in
every file, so the detected format (:func:`detect_format`) is a label that conversion does not
depend on. :func:`to_format` / :func:`save_lora` write canonical layers in a format.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping

import torch

from models.safetensors_bytes import save_file
from registry.lora.formats import (
    bfl_control,
    bfl_peft,
    comfyui,
    diffusers,
    fal_kontext,
    kohya,
    onetrainer,
    peft,
    xlabs,
)
from registry.lora.formats.names import NameResolver, Parts, text_encoder_layer
from registry.lora.formats.spec import Format, LayerFactors

Tensor = torch.Tensor

# Detection order: the first format whose test holds names the file (peft always holds).
REGISTRY: tuple[Format, ...] = tuple(m.FORMAT for m in (
    bfl_control, xlabs, fal_kontext, onetrainer, comfyui, kohya, bfl_peft, diffusers, peft))
_BY_NAME = {f.name: f for f in REGISTRY}
FORMATS = ("diffusers", "kohya", "comfyui", "xlabs", "onetrainer", "bfl_peft")  # written too
assert all(_BY_NAME[name].writer for name in FORMATS)

# The composed reader: every format's suffixes (longest first), prefixes and extra names.
_ROLES = sorted({r for f in REGISTRY for r in f.roles}, key=lambda r: (-len(r[0]), r))
_PREFIXES = tuple(dict.fromkeys(p for f in REGISTRY for p in f.prefixes))
_TE_PREFIXES = tuple(dict.fromkeys(p for f in REGISTRY for p in f.te_prefixes))
_NAMES = NameResolver({
    kind: {k: v for f in REGISTRY for k, v in f.block_names.get(kind, {}).items()}
    for kind in ("double_blocks", "single_blocks")})


def get(name: str) -> Format:
    """The format called ``name``; ``ValueError`` if there is none."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown format {name!r}; expected one of {tuple(_BY_NAME)}")
    return _BY_NAME[name]


def detect_format(keys: Iterable[str]) -> str:
    """Name a file's format from its keys (a label only; conversion does not depend on it)."""
    ks = list(keys)
    return next(f.name for f in REGISTRY if f.detect(ks))


_ROLE_OF = dict(_ROLES)
_ROLE_DEPTHS = sorted({s.count(".") for s in _ROLE_OF}, reverse=True)  # dotted parts of a suffix, most first


def split_key(key: str) -> tuple[str, str] | None:
    """``(module, role)`` of a LoRA key, role ``down`` (A), ``up`` (B) or ``alpha``; else None.
    The longest role suffix the key ends with wins; every suffix starts at a dot, so of two that
    match the longer has more dotted parts: looked up by the key's last 3, 2, 1 parts (one dict
    look-up each instead of an ``endswith`` per suffix: 1,482 OneTrainer keys 5 -> 1.5 ms)."""
    parts = key.rsplit(".", _ROLE_DEPTHS[0])
    for depth in _ROLE_DEPTHS:
        if len(parts) > depth:
            suffix = "." + ".".join(parts[-depth:])
            role = _ROLE_OF.get(suffix)
            if role is not None:
                return key[: -len(suffix)], role
    return None


@functools.lru_cache(maxsize=1 << 14)
def module_layers(module: str) -> tuple[Parts, bool] | None:
    """The canonical layer(s) a file's LoRA module (its key without the role suffix) adapts,
    in row order for a fused module, and whether B's row halves swap; ``None`` if unknown."""
    if module.startswith(_TE_PREFIXES):
        te = text_encoder_layer(module)
        if te is not None:
            return (te,), False
    name, changed = module, True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return _NAMES.layer(name)


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
    return _BY_NAME[fmt].write(lora_layers, alpha)


def save_lora(
    path: str | os.PathLike[str],
    lora_layers: LayerFactors,
    fmt: str,
    *,
    metadata: dict[str, str] | None = None,
    alpha: float | None = None,
) -> None:
    """Write canonical layers to a ``.safetensors`` file in format ``fmt`` (see ``to_format``): the
    same layers and metadata give the same bytes in every process."""
    state = to_format(lora_layers, fmt, alpha=alpha)
    seen: set[int] = set()
    for key, tensor in state.items():  # safetensors refuses tensors that share storage
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            state[key] = tensor.clone()
        seen.add(ptr)
    save_file(state, os.fspath(path), metadata=metadata)


__all__ = ["FORMATS", "REGISTRY", "Format", "detect_format", "get", "module_layers",
           "save_lora", "split_key", "to_format"]
