"""Convert grouped LoRA modules of any FLUX format to canonical layers, checked two ways.

:func:`group` splits a state dict into LoRA modules (validated down/up/alpha triples) and other
keys. :func:`convert_checked` runs diffusers' own converters (``FluxPipeline.lora_state_dict``,
fed float32 copies so alpha folding loses no precision) and checks the result against our name
map (:mod:`registry.lora.formats`). Our map wins where diffusers fails or disagrees; the gaps we
found in diffusers 0.42 are: BFL names with PEFT suffixes pass through unconverted (its loader
then drops them), kohya/ComfyUI conversion hard-codes FLUX.1's 19/38 blocks and 3072/12288 split
sizes, OneTrainer names outside attention collapse onto the block name, fal/Kontext and BFL
Control need full coverage, and BFL Control's final adaLN swap is applied to ``lora_A`` too.
XLabs files are converted by diffusers alone.

Where diffusers' converter would hand the state dict back unchanged (:func:`diffusers_keeps`:
diffusers/PEFT names, no alphas; the usual case), its result is by construction our name map's
own, so that is used directly, without the float32 copy. Converted layers keep the file's float
dtype unless an alpha is folded into B (then B is float32).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from registry.lora.errors import RejectedFile
from registry.lora.fingerprint import signs
from registry.lora.formats import (
    fused_part_sizes,
    resolve_layer_name,
    resolve_text_encoder_name,
    split_key,
    swap_halves,
)

Tensor = torch.Tensor
Layers = dict[str, tuple[Tensor, Tensor]]


# --- grouping raw keys into (down, up, alpha) modules ------------------------------------------
@dataclass
class Module:
    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None


def _as_matrix(t: Tensor, key: str) -> Tensor:
    if t.ndim == 4 and tuple(t.shape[2:]) == (1, 1):  # 1x1 conv LoRA == linear
        t = t.reshape(t.shape[0], t.shape[1])
    if t.ndim != 2:
        raise RejectedFile("rank_mismatch",
                           f"{key} has shape {tuple(t.shape)}; a LoRA factor must be a matrix")
    return t


def group(tensors: Mapping[str, Tensor | float]) -> tuple[dict[str, Module], list[str]]:
    """Split keys into LoRA modules (validated pairs) and the keys that are no LoRA factor."""
    modules: dict[str, Module] = {}
    extras: list[str] = []
    for key, value in tensors.items():
        role = split_key(key)
        if role is None:
            extras.append(key)
            continue
        prefix, kind = role
        module = modules.setdefault(prefix, Module())
        if kind == "alpha":
            if isinstance(value, Tensor) and value.numel() != 1:
                raise RejectedFile("bad_alpha", f"{key} has shape {tuple(value.shape)}; "
                                                "an alpha is a scalar")
            module.alpha = float(value.item() if isinstance(value, Tensor) else value)
        else:
            setattr(module, kind, _as_matrix(value, key))
    for prefix, m in list(modules.items()):
        if m.down is None and m.up is None:  # an alpha with no factors: nothing to apply it to
            del modules[prefix]
        elif m.down is None or m.up is None:
            which = "up" if m.down is None else "down"
            raise RejectedFile("unpaired_lora_key",
                               f"{prefix}: a LoRA {which} matrix without its partner")
        elif m.down.shape[0] != m.up.shape[1]:
            raise RejectedFile("rank_mismatch", f"{prefix}: A/down has {m.down.shape[0]} rows but "
                                                f"B/up has {m.up.shape[1]} columns")
        elif m.down.shape[0] == 0 and m.alpha is not None:  # alpha / rank is undefined
            raise RejectedFile("rank_mismatch", f"{prefix}: rank 0 with an alpha ({m.alpha}); "
                                                "alpha / rank is undefined")
    return modules, extras


# --- conversion --------------------------------------------------------------------------------
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.",
             "lora_unet_", "lora_transformer_")


@functools.lru_cache(maxsize=1 << 14)
def _targets(prefix: str) -> tuple[tuple[str, ...], bool] | None:
    te = resolve_text_encoder_name(prefix)
    if te is not None:
        return (te,), False
    name, changed = prefix, True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return resolve_layer_name(name)


def _check_known(modules: Mapping[str, Module]) -> None:
    unknown = [p for p in modules if _targets(p) is None]
    if unknown:
        raise ValueError(f"{len(unknown)} unrecognised LoRA modules, e.g. {unknown[:3]}")


def _convert_module(prefix: str, m: Module, dtype: torch.dtype | None = None
                    ) -> list[tuple[str, tuple[Tensor, Tensor]]]:
    """One module's canonical layer(s): alpha/rank folded into B (in float32), a fused B split by
    rows. Factors keep their dtype unless ``dtype`` is given."""
    parts, swap = _targets(prefix)
    a, b = m.down, m.up
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    if m.alpha is not None:
        b = b.to(torch.float32) * (m.alpha / a.shape[0])
    if swap:
        b = swap_halves(b)
    sizes = fused_part_sizes(len(parts), b.shape[0], a.shape[1])
    rows = torch.split(b, sizes, dim=0)
    return [(part, (a, r)) for part, r in zip(parts, rows, strict=True)]


def convert(modules: Mapping[str, Module]) -> Layers:
    """Our own conversion: name map, alpha/rank folded into B, fused layers split by B's rows."""
    _check_known(modules)
    layers: Layers = {}
    for prefix, m in modules.items():
        for part, factors in _convert_module(prefix, m):
            if part in layers:
                raise ValueError(f"layer {part} is given twice")
            layers[part] = factors
    return layers


# Key substrings on which FluxLoraLoaderMixin.lora_state_dict (diffusers 0.42) converts or pops
# anything: DoRA scales, kohya, XLabs, BFL Control, fal/Kontext, alphas. A state dict with none
# of them is returned as it came (tests/registry/test_canonical.py checks this against diffusers).
_DIFFUSERS_CONVERTS = ("dora_scale", ".lora_down.weight", "processor", "query_norm.scale",
                       "base_model", "alpha")


def diffusers_keeps(keys: Iterable[str]) -> bool:
    """Whether diffusers' FLUX converter returns a state dict with these keys unchanged."""
    return not any(m in key for key in keys for m in _DIFFUSERS_CONVERTS)


def _via_diffusers(tensors: Mapping[str, Tensor]) -> Layers:
    from diffusers import FluxPipeline

    # float32 copies: the converters pop keys, scale in place and would round in float16.
    copy = {k: v.to(torch.float32, copy=True) for k, v in tensors.items()}
    state, alphas = FluxPipeline.lora_state_dict(copy, return_alphas=True)
    modules, _ = group({**state, **(alphas or {})})
    return convert(modules)


def _probe(a: Tensor, b: Tensor) -> Tensor:
    return b.double() @ (a.double() @ signs(a.shape[1], 1)[:, 0])


def _equal(x: Tensor, y: Tensor) -> bool:
    """Same shape, dtype and values (NaN equals nothing); numpy's compare is ~3x torch.equal's."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    try:
        return bool(np.array_equal(x.detach().numpy(), y.detach().numpy()))
    except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16)
        return torch.equal(x, y)


def _layer_agrees(mine: tuple[Tensor, Tensor], theirs: tuple[Tensor, Tensor]) -> bool:
    """The same ``ΔW x`` for a fixed probe ``x`` (to 1e-4 relative); identical factors (the usual
    case) give an identical ``ΔW x`` and skip the float64 probe."""
    (a, b), (c, d) = mine, theirs
    if _equal(a, c) and _equal(b, d):
        return True
    y, z = _probe(a, b), _probe(c, d)
    return bool(y.shape == z.shape and (y - z).norm() <= 1e-4 * y.norm() + 1e-12)


# Modules whose ΔW is probed on the cheap check (besides those named below): a few picked by a
# hash of the prefix, so the choice is deterministic for a file.
_PROBED_MODULES = 4


def _probe_set(modules: Mapping[str, Module]) -> set[str]:
    """The modules whose ΔW :func:`convert_checked` compares with diffusers' result.

    Names and shapes of every layer are always compared (that catches every name-level gap we
    know of in diffusers' converters). Values are compared on: every module whose halves our map
    swaps (diffusers' BFL-Control swap of ``lora_A`` differs only there), the first and last fused
    module (part order), the first and last module, and a few more picked by a hash of the name.
    """
    _check_known(modules)  # ValueError where our map cannot convert (as _name_map_agrees_on)
    prefixes = sorted(modules)
    chosen = {prefixes[0], prefixes[-1]}
    fused = []
    for prefix in prefixes:
        parts, swap = _targets(prefix)
        if swap:
            chosen.add(prefix)
        if len(parts) > 1:
            fused.append(prefix)
    if fused:
        chosen |= {fused[0], fused[-1]}
    ranked = sorted(prefixes, key=lambda p: hashlib.sha256(p.encode()).digest())
    chosen.update(ranked[:_PROBED_MODULES])
    return chosen


def _name_map_agrees_on(modules: Mapping[str, Module], theirs: Layers, probed: set[str]) -> bool:
    """Same layer names and ΔW shapes as ``convert(modules)`` everywhere, and the same
    ``ΔW x`` on the modules in ``probed``. Raises ``ValueError`` exactly where ``convert`` does."""
    _check_known(modules)
    seen: set[str] = set()
    agree = True
    for prefix, m in modules.items():
        if prefix in probed:
            converted = _convert_module(prefix, m, torch.float32)
        else:  # names and shapes only: no float32 copy, no probe
            parts, _ = _targets(prefix)
            k = m.down.shape[1]
            sizes = fused_part_sizes(len(parts), m.up.shape[0], k)
            converted = [(part, (None, (rows, k))) for part, rows in zip(parts, sizes, strict=True)]
        for part, factors in converted:
            if part in seen:
                raise ValueError(f"layer {part} is given twice")
            seen.add(part)
            # after a mismatch, keep converting: a later ValueError still means "name map failed"
            if not agree or part not in theirs:
                agree = False
            elif factors[0] is None:
                c, d = theirs[part]  # ΔW's shape (d, k); ranks may differ (zero padding)
                agree = c.shape[0] == d.shape[1] and (d.shape[0], c.shape[1]) == factors[1]
            else:
                agree = _layer_agrees(factors, theirs[part])
    return agree and seen == theirs.keys()


def convert_checked(tensors: Mapping[str, Tensor], modules: Mapping[str, Module],
                     notes: list[str]) -> Layers:
    """diffusers' conversion, checked against our name map (which wins on failure or mismatch).

    When diffusers would return the state dict unchanged, its conversion *is* ``convert(modules)``
    (grouped from the same keys), so that is returned without running it; only a name-map failure
    goes the long way, which words the rejection.
    """
    if diffusers_keeps(tensors):
        try:
            return convert(modules)
        except ValueError:
            pass
    try:
        theirs = _via_diffusers(tensors)
    except Exception as exc:  # noqa: BLE001 - third-party converters raise anything (assert, ...)
        failed = f"diffusers: {type(exc).__name__}: {exc}"[:300]
        try:
            mine = convert(modules)
        except ValueError as mine_exc:
            raise RejectedFile("unsupported_layers",
                               f"could not convert: name map: {mine_exc}; {failed}") from None
        notes.append(failed)
        return mine
    try:
        if _name_map_agrees_on(modules, theirs, _probe_set(modules)):
            return theirs
    except ValueError:  # our name map cannot convert this file: diffusers' result stands
        return theirs
    notes.append("diffusers' converter disagreed with our name map; used the name map")
    return convert(modules)
