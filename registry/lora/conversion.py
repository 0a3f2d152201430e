"""Convert grouped LoRA modules of any FLUX format to canonical layers, cross-checked by diffusers.

:func:`group` splits a state dict into LoRA modules (validated down/up/alpha triples) and other
keys. :func:`convert` is the primary conversion for every format: the project's own name map
(:mod:`registry.lora.formats`), alpha/rank folded into B, fused layers split by B's rows.
:func:`convert_checked` runs it, then diffusers' own converter (``FluxPipeline.lora_state_dict``,
fed float32 copies so alpha folding loses no precision) on a deterministic sample of the file's
modules (:func:`sample_modules`; the whole file for formats whose converter needs every block:
fal/Kontext, BFL Control) and compares layer names, ΔW shapes and ΔW on a fixed probe. Our
result stands; a diffusers failure or disagreement is noted. Where our name map cannot convert
a file, diffusers' conversion of the whole file is used if it covers every module; where neither
can, it is rejected. A layer given twice with different weights is rejected, never resolved.

The gaps we found in diffusers 0.42 (where our map is right and the check notes it): BFL names
with PEFT suffixes pass through unconverted (its loader then drops them), kohya/ComfyUI
conversion hard-codes FLUX.1's 19/38 blocks and 3072/12288 split sizes and ignores the final
layer's alphas, OneTrainer names outside attention collapse onto the block name, fal/Kontext
and BFL Control need full coverage, and BFL Control's final adaLN swap is applied to
``lora_A`` too.

Where diffusers' converter would hand the state dict back unchanged (:func:`diffusers_keeps`:
diffusers/PEFT names, no alphas; the usual case), its result is by construction our name map's
own, so no check runs. Converted layers keep the file's float dtype unless an alpha is folded
in inexactly (then the smaller factor is float32).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from registry.lora.errors import RejectedFile
from registry.lora.fingerprint import signs
from registry.lora.formats import Format, module_layers, split_key
from registry.lora.formats.names import fused_part_sizes, swap_halves

Tensor = torch.Tensor
Layers = dict[str, tuple[Tensor, Tensor]]


# --- grouping raw keys into (down, up, alpha) modules ------------------------------------------
@dataclass
class Module:
    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)  # the file's keys of this module


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
        module.keys.append(key)
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


# --- our conversion ----------------------------------------------------------------------------
def _scaled(t: Tensor, scale: float) -> Tensor:
    """``scale * t``: in ``t``'s dtype where that is exact (a power-of-two scale of a bfloat16 or
    float32 factor: the usual kohya alphas 1, rank / 2, rank), else in float32."""
    if math.frexp(scale)[0] == 0.5 and t.dtype in (torch.bfloat16, torch.float32):
        return t * scale
    return t.to(torch.float32) * scale


def _fold(a: Tensor, b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``B A`` scaled by ``scale``, folded into the smaller factor (less work)."""
    if scale == 1.0:
        return a, b
    return (_scaled(a, scale), b) if a.numel() <= b.numel() else (a, _scaled(b, scale))


def _convert_module(prefix: str, m: Module) -> list[tuple[str, tuple[Tensor, Tensor]]]:
    """One module's canonical layer(s): alpha/rank folded into the smaller factor, a fused B split
    by rows. Factors keep their dtype otherwise."""
    parts, swap = module_layers(prefix)
    a, b = m.down, m.up
    if m.alpha is not None:
        a, b = _fold(a, b, m.alpha / a.shape[0])
    if swap:
        b = swap_halves(b)
    sizes = fused_part_sizes(len(parts), b.shape[0], a.shape[1])
    rows = torch.split(b, sizes, dim=0)
    return [(part, (a, r)) for part, r in zip(parts, rows, strict=True)]


def _probe(a: Tensor, b: Tensor) -> Tensor:
    """``ΔW x`` for a fixed ±1 probe ``x``, in float32 (ample for a 1e-4 comparison)."""
    return b.float() @ (a.float() @ signs(a.shape[1], 1)[:, 0].float())


def _equal(x: Tensor, y: Tensor) -> bool:
    """Same shape, dtype and values (NaN equals nothing); numpy's compare is ~3x torch.equal's."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    try:
        return bool(np.array_equal(x.detach().numpy(), y.detach().numpy()))
    except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16)
        return torch.equal(x, y)


def _layer_agrees(mine: tuple[Tensor, Tensor], theirs: tuple[Tensor, Tensor]) -> bool:
    """The same ``ΔW x`` for a fixed probe ``x`` (to 1e-4 relative); identical factors give an
    identical ``ΔW x`` and skip the probe."""
    (a, b), (c, d) = mine, theirs
    if _equal(a, c) and _equal(b, d):
        return True
    y, z = _probe(a, b), _probe(c, d)
    return bool(y.shape == z.shape and (y - z).norm() <= 1e-4 * y.norm() + 1e-12)


def convert(modules: Mapping[str, Module], notes: list[str] | None = None) -> Layers:
    """Our own conversion: name map, alpha/rank folded into B, fused layers split by B's rows.

    A layer given twice (e.g. in kohya and in diffusers spelling) with the same ΔW is kept once
    (noted in ``notes``); with a different ΔW the file is ambiguous: :class:`RejectedFile`
    ``duplicate_layer``. Raises ``ValueError`` for modules the map does not know.
    """
    layers: Layers = {}
    owner: dict[str, str] = {}
    unknown, repeated = [], []
    for prefix, m in modules.items():
        if module_layers(prefix) is None:
            unknown.append(prefix)
            continue
        for part, factors in _convert_module(prefix, m):
            if part not in layers:
                layers[part], owner[part] = factors, prefix
            elif _layer_agrees(layers[part], factors):
                repeated.append(part)
            else:
                raise RejectedFile("duplicate_layer", f"layer {part} is given twice with different "
                                                      f"weights (by {owner[part]} and {prefix}); "
                                                      "which one applies is ambiguous")
    if unknown:
        raise ValueError(f"{len(unknown)} unrecognised LoRA modules, e.g. {unknown[:3]}")
    if repeated and notes is not None:
        notes.append(f"{len(repeated)} layers are given twice with the same weights (e.g. "
                     f"{repeated[0]}); kept once")
    return layers


# --- diffusers' conversion, the cross-check ----------------------------------------------------
# Key substrings on which FluxLoraLoaderMixin.lora_state_dict (diffusers 0.42) converts or pops
# anything: DoRA scales, kohya, XLabs, BFL Control, fal/Kontext, alphas. A state dict with none
# of them is returned as it came (tests/registry/lora/test_canonical.py checks this).
_DIFFUSERS_CONVERTS = ("dora_scale", ".lora_down.weight", "processor", "query_norm.scale",
                       "base_model", "alpha")


def diffusers_keeps(keys: Iterable[str]) -> bool:
    """Whether diffusers' FLUX converter returns a state dict with these keys unchanged."""
    return not any(m in key for key in keys for m in _DIFFUSERS_CONVERTS)


def diffusers_lora_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """What ``FluxLoraLoaderMixin.lora_state_dict(state, return_alphas=True)`` returns (diffusers
    0.42): its converters from ``diffusers.loaders.lora_conversion_utils``, chosen by the same key
    tests in the same order. Importing that module costs a new process ~1.6 s; importing the
    pipeline class (transformers' text encoders, peft) ~3 s more, which a one-file ``autolora
    ingest`` paid. ``tests/registry/lora/test_formats.py`` checks that both give the same on every
    format. ``state`` is modified, as diffusers modifies it."""
    from diffusers.loaders import lora_conversion_utils as diffusers_converters

    for key in [k for k in state if "dora_scale" in k]:  # diffusers drops DoRA scales (with a warning)
        del state[key]
    for mark, converter in ((".lora_down.weight", "_convert_kohya_flux_lora_to_diffusers"),
                            ("processor", "_convert_xlabs_flux_lora_to_diffusers"),
                            ("query_norm.scale", "_convert_bfl_flux_control_lora_to_diffusers"),
                            ("base_model", "_convert_fal_kontext_lora_to_diffusers")):
        if any(mark in k for k in state):
            return getattr(diffusers_converters, converter)(state), None
    alphas = {}
    for key in [k for k in state if "alpha" in k]:
        value = state[key]
        if not (torch.is_tensor(value) and torch.is_floating_point(value) or isinstance(value, float)):
            raise ValueError(f"The alpha key ({key}) seems to be incorrect.")  # as diffusers says
        alphas[key] = state.pop(key)
    return state, alphas


def _via_diffusers(tensors: Mapping[str, Tensor]) -> Layers:
    # float32 copies: the converters pop keys, scale in place and would round in float16.
    copy = {k: v.to(torch.float32, copy=True) for k, v in tensors.items()}
    state, alphas = diffusers_lora_state_dict(copy)
    modules, _ = group({**state, **(alphas or {})})
    return convert(modules)


_HASHED_MODULES = 2  # modules picked by a hash of the name, besides the rule-picked ones
_NUMBER = re.compile(r"\d+")
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def sample_modules(modules: Mapping[str, Module]) -> set[str]:
    """The modules diffusers' converter is run on and compared with ours: deterministic for a file.

    One module per kind (the name with its numbers as ``#``: the lowest-numbered; names depend on
    the kind, not the index), the highest-numbered module of each block family (diffusers
    hard-codes FLUX.1's block counts), every module whose B halves swap (diffusers' BFL-Control
    swap of ``lora_A`` differs only there) and a few more picked by a hash of the name.
    """
    kinds: dict[str, tuple[tuple[int, ...], str]] = {}
    last: dict[str, tuple[int, str]] = {}
    chosen = set()
    for prefix in sorted(modules):
        numbers = tuple(map(int, _NUMBER.findall(prefix)))
        kind = _NUMBER.sub("#", prefix)
        if kind not in kinds or numbers < kinds[kind][0]:
            kinds[kind] = (numbers, prefix)
        parts, swap = module_layers(prefix)
        if swap:
            chosen.add(prefix)
        m = _BLOCK.match(parts[0])
        if m and (m.group(1) not in last or int(m.group(2)) > last[m.group(1)][0]):
            last[m.group(1)] = (int(m.group(2)), prefix)
    chosen |= {p for _, p in kinds.values()} | {p for _, p in last.values()}
    ranked = sorted(modules, key=lambda p: hashlib.sha256(p.encode()).digest())
    chosen.update(ranked[:_HASHED_MODULES])
    return chosen


def _agrees(mine: Layers, theirs: Layers, fed: Iterable[str], probed: Iterable[str]) -> bool:
    """diffusers' layers from the modules ``fed`` have our names and ΔW shapes, and our ΔW x on
    the layers of the modules ``probed``."""
    covered = {part for p in fed for part in module_layers(p)[0]}
    if theirs.keys() != covered:
        return False
    for part in covered:
        (a, b), (c, d) = mine[part], theirs[part]
        if c.shape[0] != d.shape[1] or (b.shape[0], a.shape[1]) != (d.shape[0], c.shape[1]):
            return False
    return all(_layer_agrees(mine[part], theirs[part])
               for p in probed for part in module_layers(p)[0])


# Alphas and diffusers: kohya, ComfyUI and OneTrainer converters in diffusers 0.42 split alpha / rank
# into two factors with ``while scale_down * 2 < scale_up``, which never ends for a negative (or
# -inf) scale. A negative alpha is still accepted, in every format: kohya's, ComfyUI's and
# diffusers' loaders apply alpha / rank as it is, so it is a valid sign-flipped update (and the
# diffusers-format path, which needs no diffusers check, always took it); our name map folds it
# like any other. So modules whose alpha is <= 0 or not finite are only kept out of diffusers'
# check. A NaN/Inf alpha is refused in every format by the NaN/Inf scan (``nan_inf``).
def diffusers_can_scale(m: Module) -> bool:
    """Whether diffusers' converters can be given this module's alpha (none, or finite and > 0)."""
    return m.alpha is None or (math.isfinite(m.alpha) and m.alpha > 0)


def _whole_file_via_diffusers(tensors: Mapping[str, Tensor], modules: Mapping[str, Module],
                              mine_exc: ValueError) -> Layers:
    """diffusers' conversion of a file our name map cannot convert, which must cover every module
    (diffusers drops names it does not know); else :class:`RejectedFile` ``unsupported_layers``."""
    def refuse(why: str) -> RejectedFile:
        return RejectedFile("unsupported_layers", f"could not convert: name map: {mine_exc}; "
                                                  f"diffusers: {why}"[:600])

    odd = next((p for p, m in modules.items() if not diffusers_can_scale(m)), None)
    if odd is not None:
        raise refuse(f"not run ({odd} has alpha {modules[odd].alpha}, which its converters "
                     "cannot take)")
    try:
        theirs = _via_diffusers(tensors)
    except Exception as exc:  # noqa: BLE001 - third-party converters raise anything
        raise refuse(f"{type(exc).__name__}: {exc}"[:300]) from None
    if len(theirs) < len(modules):  # each module gives one layer or more (fused ones split)
        raise refuse(f"converted only {len(theirs)} layers from the file's {len(modules)} LoRA "
                     "modules")
    return theirs


def convert_checked(tensors: Mapping[str, Tensor], modules: Mapping[str, Module],
                    notes: list[str], fmt: Format | None = None) -> Layers:
    """Our conversion, cross-checked by diffusers' converter on a sample (see the module doc).

    ``fmt``: the file's detected format (``None``: run diffusers on a sample). Appends to
    ``notes`` when diffusers fails or disagrees or is not run; raises :class:`RejectedFile` when
    neither our name map nor diffusers can convert the file, or when it gives a layer twice with
    different weights.
    """
    try:
        mine = convert(modules, notes)
    except ValueError as mine_exc:  # our map cannot: diffusers' conversion of the whole file
        return _whole_file_via_diffusers(tensors, modules, mine_exc)
    if diffusers_keeps(tensors):
        return mine
    checkable = {p: m for p, m in modules.items() if diffusers_can_scale(m)}
    on_sample = fmt is None or fmt.diffusers_on_sample
    if len(checkable) < len(modules):
        odd = next(p for p in modules if p not in checkable)
        if not checkable or not on_sample:
            notes.append(f"diffusers check not run: {len(modules) - len(checkable)} modules have "
                         f"an alpha <= 0 or not finite (e.g. {odd}), which its converters "
                         "cannot take")
            return mine
        notes.append(f"diffusers check left out {len(modules) - len(checkable)} modules with an "
                     f"alpha <= 0 or not finite (e.g. {odd})")
    probed = sample_modules(checkable)
    fed = probed if on_sample else modules.keys()
    sample = {k: tensors[k] for p in fed for k in modules[p].keys} if on_sample else tensors
    try:
        theirs = _via_diffusers(sample)
    except Exception as exc:  # noqa: BLE001 - third-party converters raise anything (assert, ...)
        notes.append(f"diffusers: {type(exc).__name__}: {exc}"[:300])
        return mine
    if not _agrees(mine, theirs, fed, probed):
        notes.append("diffusers' converter disagreed with our name map; used the name map")
    return mine
