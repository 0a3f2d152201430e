"""Read a LoRA state dict in any supported FLUX format into one canonical object.

Pipeline of :func:`canonicalise`: refuse what is not a plain LoRA (LoKr, LoHa, DoRA, full
checkpoints, ...), detect the base architecture from keys/shapes (metadata second), then convert
(:mod:`registry.lora.conversion`: our name map, cross-checked by diffusers' converters), fold PEFT
scales and drop exactly-zero rank components. The weights fingerprint lives in
:mod:`registry.lora.fingerprint` and is re-exported here.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import regex  # PEFT patterns: unlike re, it can time a match out
import torch

from registry.lora.conversion import Module, convert_checked, group
from registry.lora.errors import RejectedFile
from registry.lora.fingerprint import (
    Inputs, Projections, Responses, features_from_projections, fingerprint_of, project, projections,
)
from registry.lora.formats import detect_format, get

Tensor = torch.Tensor
Layers = dict[str, tuple[Tensor, Tensor]]
SD_FAMILIES = ("sd1", "sd2", "sdxl", "sd3")


@dataclass
class CanonicalLoRA:
    """``module path -> (A [r,k], B [d,r])`` with alpha folded in so that ``ΔW = B @ A``.

    ``factors`` keep the file's float dtype (a bfloat16 LoRA is not widened; the smaller factor is
    float32 where a scale was folded in inexactly) and may share memory with the tensors read;
    no rank component of any layer is exactly zero. :attr:`layers` is the same in float32,
    contiguous and in memory of its own, made on first use (ingest never needs it).
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    format: str
    architecture: str
    notes: list[str] = field(default_factory=list)  # what conversion dropped or worked around
    _projections: Projections | None = field(default=None, repr=False, compare=False)
    # an encoder's layer responses made in the fingerprint's pass: {version: {name: [P, d]}}
    responses: Responses = field(default_factory=dict, repr=False, compare=False)

    @functools.cached_property
    def layers(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``factors`` as float32 contiguous copies sharing memory with nothing else."""
        def own(t: Tensor) -> Tensor:
            return t.to(torch.float32, memory_format=torch.contiguous_format, copy=True)

        return {name: (own(a), own(b)) for name, (a, b) in self.factors.items()}

    def projections(self) -> Projections:
        """The fingerprint's per-layer probe projections (computed once)."""
        if self._projections is None:
            self._projections = projections(self.factors)[0]
        return self._projections

    @property
    def rank(self) -> int:
        """The largest rank over layers."""
        return max((a.shape[0] for a, _ in self.factors.values()), default=0)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``name -> (d, k)`` of every adapted layer."""
        return {name: (int(b.shape[0]), int(a.shape[1])) for name, (a, b) in self.factors.items()}


# --- architecture and format detection --------------------------------------------------------
_UNET_MARKS = ("down_blocks_", "up_blocks_", "mid_block_", "input_blocks_", "output_blocks_",
               "middle_block_")
_SD3_MARKS = ("joint_blocks_", "context_block_", "x_block_")
_FLUX_MARKS = ("double_blocks_", "single_blocks_", "single_transformer_blocks_",
               "guidance_embedder", "guidance_in_")
_DOWN_MARKS = ("lora_down", "lora_A", "down_weight", "lora_linear_layer_down")


def _width(keys_and_shapes: Mapping[str, tuple[int, ...]], pattern: str) -> int | None:
    """In-features of the first down/A matrix whose key (dots as ``_``) matches ``pattern``."""
    compiled = re.compile(pattern)
    for key, shape in keys_and_shapes.items():
        k = key.replace(".", "_")
        if compiled.search(k) and any(m in k for m in _DOWN_MARKS) and len(shape) >= 2:
            return int(shape[1])
    return None


def _architecture_from_keys(keys_and_shapes: Mapping[str, tuple[int, ...]],
                            widths: Mapping[int, str] | None = None) -> str:
    joined = "\n".join(keys_and_shapes).replace(".", "_")  # one string: a mark is looked for once, in C

    def has(*marks: str) -> bool:
        return any(m in joined for m in marks)  # (no mark holds a newline, so none spans two keys)

    if has(*_UNET_MARKS):  # SD UNets: the cross-attention input width names the version
        width = _width(keys_and_shapes, r"attn2_to_[kv]")
        return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width or 0) or (
            "sdxl" if has("lora_te2_", "text_encoder_2_") else "unknown")
    if has(*_SD3_MARKS):
        return "sd3"
    if has(*_FLUX_MARKS):
        return "flux"
    if has("transformer_blocks_"):  # diffusers names shared by FLUX and SD3: go by width
        width = _width(keys_and_shapes, r"transformer_blocks_\d+_attn_(to_q|to_k|to_v|add_q_proj)")
        return {**(widths or {}), 3072: "flux", 1536: "sd3", 2432: "sd3"}.get(width or 0, "unknown")
    if has("lora_te2_text_model", "text_encoder_2_text_model"):
        return "sdxl"
    if has("encoder_block_", "SelfAttention", "DenseReluDense"):  # T5 text encoder: FLUX
        return "flux"
    return "unknown"


_METADATA_MARKS = (
    ("flux", ("flux",)),
    ("sdxl", ("sdxl", "stable-diffusion-xl")),
    ("sd3", ("sd3", "stable-diffusion-3")),
    ("sd2", ("sd_v2", "sd_2", "stable-diffusion-v2")),
    ("sd1", ("sd_v1", "sd_1", "stable-diffusion-v1")),
)


def _architecture_from_metadata(metadata: Mapping[str, str]) -> str:
    for key in ("modelspec.architecture", "ss_base_model_version"):
        text = str(metadata.get(key, "")).lower()
        for family, marks in _METADATA_MARKS:
            if any(m in text for m in marks):
                return family
    return "unknown"


def detect_architecture(
    keys_and_shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str],
    widths: Mapping[int, str] | None = None,
) -> str:
    """``flux|sdxl|sd1|sd2|sd3|unknown``: from keys and shapes first, metadata second.
    ``widths``: attention widths of registered bases -> their architecture (a tiny FLUX's
    diffusers names are told from SD3's by its width, as FLUX.1's 3072 is)."""
    found = _architecture_from_keys(keys_and_shapes, widths)
    return found if found != "unknown" else _architecture_from_metadata(metadata or {})


def _drop_zero_components(factors: Layers, proj: Projections) -> None:
    """Remove rank components that are exactly zero (row j of A or column j of B; zero-padded
    fused parts, untrained layers), and layers left with none, from ``factors`` and ``proj``.

    An exactly-zero component has an all-zero row in ``A X`` or column in ``U^T B`` (the
    fingerprint's projections), so only components showing that are checked element by element.
    """
    names = list(factors)
    if not names:
        return
    ax = torch.cat([proj[n][0] for n in names])  # [R, P]
    ubt = torch.cat([proj[n][1].T for n in names])  # [R, P]
    suspects = ((ax == 0).all(dim=1) | (ubt == 0).all(dim=1)).nonzero().flatten().tolist()
    if not suspects:
        return
    starts = list(itertools.accumulate((factors[n][0].shape[0] for n in names), initial=0))
    by_layer: dict[str, list[int]] = {}
    for row in suspects:
        i = bisect.bisect_right(starts, row) - 1
        by_layer.setdefault(names[i], []).append(row - starts[i])
    for name, rows in by_layer.items():
        a, b = factors[name]
        idx = torch.tensor(rows)
        zero = ~(a[idx].ne(0).any(dim=1) & b[:, idx].ne(0).any(dim=0))
        if not bool(zero.any()):
            continue
        keep = torch.ones(a.shape[0], dtype=torch.bool)
        keep[idx[zero]] = False
        if not bool(keep.any()):
            del factors[name], proj[name]
            continue
        a, b = a[keep].contiguous(), b[:, keep].contiguous()
        factors[name], proj[name] = (a, b), project(a, b)


MAX_PEFT_PATTERNS = 4096  # rank_pattern + alpha_pattern entries (each is tried on every layer)
PATTERN_TIMEOUT_S = 0.05  # one module name against one pattern: a real pattern takes microseconds


class _PeftScale(NamedTuple):
    """One model's part of a PEFT config, validated: ``r``, ``lora_alpha``, compiled
    ``rank_pattern`` / ``alpha_pattern`` entries and ``use_rslora``."""

    r: float
    alpha: float
    ranks: list[tuple[regex.Pattern, float]]
    alphas: list[tuple[regex.Pattern, float]]
    rslora: bool

    def of(self, module: str) -> float:
        """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) of ``module``; the first pattern matching
        the name or its ending wins, as in PEFT."""
        r = next((v for rx, v in self.ranks if _matches(rx, module)), self.r)
        alpha = next((v for rx, v in self.alphas if _matches(rx, module)), self.alpha)
        return alpha / (math.sqrt(r) if self.rslora else r)


def _matches(pattern: regex.Pattern, module: str) -> bool:
    """``pattern`` matches all of ``module``; a pattern that backtracks for longer than
    :data:`PATTERN_TIMEOUT_S` (a hostile ``(a+)+$``: ``re`` has no timeout, the ``regex``
    package has) refuses the file instead of hanging the ingest."""
    try:
        return pattern.fullmatch(module, timeout=PATTERN_TIMEOUT_S) is not None
    except TimeoutError:
        raise _bad_config(f"the pattern {pattern.pattern[8:-1][:80]!r} takes over {PATTERN_TIMEOUT_S} s to "
                          f"match the module name {module[:120]!r}") from None


def _bad_config(what: str) -> RejectedFile:
    return RejectedFile("invalid_metadata", f"lora_adapter_metadata (a PEFT config): {what}"[:400])


def _config_number(value: object, key: str, *, rank: bool) -> float:
    """A PEFT ``r`` (an integer >= 1) or ``lora_alpha`` (a finite number: a negative alpha is a
    sign-flipped scale, accepted as a negative ``.alpha`` key is)."""
    need = "an integer >= 1" if rank else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_config(f"{key} is {str(value)[:80]!r} ({type(value).__name__}); it must be {need}")
    try:
        x = float(value)
    except OverflowError:  # an integer beyond float range
        x = math.inf
    if not math.isfinite(x) or (rank and not (x >= 1 and x.is_integer())):
        raise _bad_config(f"{key} is {str(value)[:80]}; it must be {need}")
    return x


def _config_patterns(value: object, key: str, *, rank: bool) -> list[tuple[regex.Pattern, float]]:
    """A ``rank_pattern`` / ``alpha_pattern``: module regex -> number, compiled."""
    if value is None:
        return []
    if not isinstance(value, dict):
        raise _bad_config(f"{key} is a JSON {type(value).__name__}, not an object mapping module "
                          "patterns to numbers")
    out = []
    for k, v in value.items():
        try:
            compiled = regex.compile(rf"(.*\.)?({k})")
        except (regex.error, RecursionError, OverflowError, ValueError) as e:
            raise _bad_config(f"{key} has the pattern {k[:80]!r}, which is not a valid regular "
                              f"expression ({e})") from None
        out.append((compiled, _config_number(v, f"{key}[{k[:80]!r}]", rank=rank)))
    return out


def _peft_owner(config: Mapping[str, object], owner: str) -> _PeftScale | None:
    """``owner``'s (``transformer``, ``text_encoder``) validated scale settings; ``None`` where
    ``r`` or ``lora_alpha`` is not given (scale 1)."""
    cfg = {k: config.get(f"{owner}.{k}", config.get(k))
           for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")}
    ranks = _config_patterns(cfg["rank_pattern"], "rank_pattern", rank=True)
    alphas = _config_patterns(cfg["alpha_pattern"], "alpha_pattern", rank=False)
    if len(ranks) + len(alphas) > MAX_PEFT_PATTERNS:
        raise _bad_config(f"{len(ranks) + len(alphas)} rank/alpha patterns, over the limit of "
                          f"{MAX_PEFT_PATTERNS}")
    if cfg["use_rslora"] is not None and not isinstance(cfg["use_rslora"], bool):
        raise _bad_config(f"use_rslora is {str(cfg['use_rslora'])[:80]!r}; it must be true or false")
    if cfg["r"] is None or cfg["lora_alpha"] is None:
        return None
    return _PeftScale(_config_number(cfg["r"], "r", rank=True),
                      _config_number(cfg["lora_alpha"], "lora_alpha", rank=False),
                      ranks, alphas, bool(cfg["use_rslora"]))


def _peft_scale(metadata: Mapping[str, str]) -> Callable[[str], float] | None:
    """Per-layer ``lora_alpha / r`` from diffusers' ``lora_adapter_metadata`` (a PEFT config),
    validated up front: a config that is not JSON, or has a value of the wrong type or range
    (``r`` 0, a string ``lora_alpha``, a NaN, a bad regex, ...) is refused as
    ``invalid_metadata``."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _bad_config(f"not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise _bad_config(f"a JSON {type(config).__name__}, not an object")
    if not config:
        return None
    owners = {owner: _peft_owner(config, owner) for owner in ("transformer", "text_encoder")}

    def scale(name: str) -> float:
        te = name.startswith("text_encoder.")
        owner, module = name.split(".", 1) if te else ("transformer", name)
        cfg = owners[owner]
        return 1.0 if cfg is None else cfg.of(module)

    return scale


_OTHER_KINDS = {  # code -> (what it is, key marks)
    "dora": ("DoRA (weight-decomposed LoRA)", ("dora_scale", "lora_magnitude", ".magnitude")),
    "lokr": ("LoKr (Kronecker-product LyCORIS)", ("lokr_w1", "lokr_w2", "lokr_t2")),
    "loha": ("LoHa (Hadamard-product LyCORIS)", ("hada_w1", "hada_w2", "hada_t1")),
}


def _check_kind(tensors: Mapping[str, Tensor], widths: Mapping[int, str] | None,
                metadata: Mapping[str, str]) -> tuple[dict[str, Module], list[str]]:
    """Refuse all but plain FLUX-family LoRAs; return the validated modules and non-LoRA keys."""
    if not tensors:
        raise RejectedFile("not_lora", "the file holds no tensors")
    joined = "\n".join(tensors)  # one string: each mark is looked for once, in C
    for code, (what, marks) in _OTHER_KINDS.items():
        if any(m in joined for m in marks):
            hit = next(k for k in tensors if any(m in k for m in marks))
            raise RejectedFile(code, f"{what} adapters are not supported (key {hit!r}); only "
                                     "plain low-rank LoRA (ΔW = B A) is")
    modules, extras = group(tensors)
    if not modules:
        weights = [k for k in extras if k.endswith((".weight", ".bias")) and tensors[k].ndim >= 2]
        if weights:
            raise RejectedFile("full_checkpoint", f"no LoRA factors but {len(weights)} plain "
                                                  f"weights (e.g. {weights[0]!r}): a checkpoint")
        raise RejectedFile("not_lora", f"no recognisable LoRA keys (e.g. {extras[0]!r})")
    arch = detect_architecture({k: tuple(v.shape) for k, v in tensors.items()}, metadata, widths)
    if arch in SD_FAMILIES:
        raise RejectedFile("unsupported_architecture", f"this is a {arch} LoRA; only FLUX-family "
                                                       "LoRAs are canonicalised for now")
    if arch != "flux":
        raise RejectedFile("unknown_architecture", "neither keys/shapes nor metadata (ss_base_"
                                                   "model_version, modelspec.architecture) name "
                                                   "a base")
    return modules, extras


def canonicalise(tensors: dict[str, Tensor], metadata: Mapping[str, str],
                 widths: Mapping[int, str] | None = None, inputs: Inputs | None = None) -> CanonicalLoRA:
    """Convert a LoRA state dict (any supported FLUX format) to a :class:`CanonicalLoRA`.

    Raises :class:`~registry.lora.errors.RejectedFile` with a stable ``code`` for everything refused.
    ``tensors`` is not modified. ``widths``: see :func:`detect_architecture`. ``inputs``: LoRA-weight
    encoders' probes, whose responses are made in the fingerprint's pass (:func:`projections`).
    """
    metadata = metadata or {}
    modules, extras = _check_kind(tensors, widths, metadata)
    notes = [f"ignored {len(extras)} non-LoRA tensors, e.g. {extras[0]!r}"] if extras else []
    fmt = detect_format(tensors)
    layers = convert_checked(tensors, modules, notes, get(fmt))
    has_alpha = any(m.alpha is not None for m in modules.values())
    scale = None if has_alpha else _peft_scale(metadata)
    factors: Layers = {}
    for name in sorted(layers):
        a, b = layers[name]
        s = scale(name) if scale else 1.0
        if a.shape[0]:
            factors[name] = (a, b if s == 1.0 else b.to(torch.float32) * s)
    proj, responses = projections(factors, inputs)  # one pass over every factor: fingerprint + zero test
    _drop_zero_components(factors, proj)  # (a zero component adds nothing to a response)
    if not factors:
        raise RejectedFile("zero_lora", "every LoRA update in the file is exactly zero")
    return CanonicalLoRA(factors, fmt, "flux", notes, proj, responses)


def fingerprint_features(lora: CanonicalLoRA) -> tuple[float, list[float]]:
    """``(log10 N, [s_m / N])``: the unrounded numbers :func:`fingerprint` hashes."""
    return features_from_projections(lora.projections())


def fingerprint(lora: CanonicalLoRA) -> str:
    """The weights fingerprint (:mod:`registry.lora.fingerprint`): equal for the same ΔW in any
    file format."""
    return fingerprint_of(lora.shapes(), lora.projections())
