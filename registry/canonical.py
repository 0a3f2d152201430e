"""Read a LoRA state dict in any supported FLUX format into one canonical object.

Pipeline of :func:`canonicalise`: refuse what is not a plain LoRA (LoKr, LoHa, DoRA, full
checkpoints, ...), detect the base architecture from keys/shapes (metadata second), then convert.
Conversion runs diffusers' own converters (``FluxPipeline.lora_state_dict``, fed float32 copies so
alpha folding loses no precision) and checks the result against our name map
(:mod:`registry.lora_formats`). Our map wins where diffusers fails or disagrees; the gaps we found
in diffusers 0.42 are: BFL names with PEFT suffixes pass through unconverted (its loader then drops
them), kohya/ComfyUI conversion hard-codes FLUX.1's 19/38 blocks and 3072/12288 split sizes,
OneTrainer names outside attention collapse onto the block name, fal/Kontext and BFL Control need
full coverage, and BFL Control's final adaLN swap is applied to ``lora_A`` too. XLabs files are
converted by diffusers alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from registry.errors import RejectedFile
from registry.lora_formats import (  # noqa: F401 - detect_format is part of this module's API
    detect_format,
    fused_part_sizes,
    resolve_layer_name,
    resolve_text_encoder_name,
    split_key,
    swap_halves,
)

Tensor = torch.Tensor
Layers = dict[str, tuple[Tensor, Tensor]]
SD_FAMILIES = ("sd1", "sd2", "sdxl", "sd3")


@dataclass
class CanonicalLoRA:
    """``module path -> (A [r,k], B [d,r])``, float32, alpha folded in so that ``ΔW = B @ A``."""

    layers: dict[str, tuple[Tensor, Tensor]]
    format: str
    architecture: str
    notes: list[str] = field(default_factory=list)  # what conversion dropped or worked around

    @property
    def rank(self) -> int:
        """The largest rank over layers."""
        return max((a.shape[0] for a, _ in self.layers.values()), default=0)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``name -> (d, k)`` of every adapted layer."""
        return {name: (int(b.shape[0]), int(a.shape[1])) for name, (a, b) in self.layers.items()}


# --- architecture and format detection --------------------------------------------------------
_UNET_MARKS = ("down_blocks_", "up_blocks_", "mid_block_", "input_blocks_", "output_blocks_",
               "middle_block_")
_SD3_MARKS = ("joint_blocks_", "context_block_", "x_block_")
_FLUX_MARKS = ("double_blocks_", "single_blocks_", "single_transformer_blocks_",
               "guidance_embedder", "guidance_in_")
_DOWN_MARKS = ("lora_down", "lora_A", "down_weight", "lora_linear_layer_down")


def _width(keys_and_shapes: Mapping[str, tuple[int, ...]], pattern: str) -> int | None:
    """In-features of the first down/A matrix whose key (dots as ``_``) matches ``pattern``."""
    regex = re.compile(pattern)
    for key, shape in keys_and_shapes.items():
        k = key.replace(".", "_")
        if regex.search(k) and any(m in k for m in _DOWN_MARKS) and len(shape) >= 2:
            return int(shape[1])
    return None


def _architecture_from_keys(keys_and_shapes: Mapping[str, tuple[int, ...]]) -> str:
    keys = [k.replace(".", "_") for k in keys_and_shapes]

    def has(*marks: str) -> bool:
        return any(m in k for k in keys for m in marks)

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
        return {3072: "flux", 1536: "sd3", 2432: "sd3"}.get(width or 0, "unknown")
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
    keys_and_shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]
) -> str:
    """``flux|sdxl|sd1|sd2|sd3|unknown``: from keys and shapes first, metadata second."""
    found = _architecture_from_keys(keys_and_shapes)
    return found if found != "unknown" else _architecture_from_metadata(metadata or {})


# --- grouping raw keys into (down, up, alpha) modules ------------------------------------------
@dataclass
class _Module:
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


def _group(tensors: Mapping[str, Tensor | float]) -> tuple[dict[str, _Module], list[str]]:
    """Split keys into LoRA modules (validated pairs) and the keys that are no LoRA factor."""
    modules: dict[str, _Module] = {}
    extras: list[str] = []
    for key, value in tensors.items():
        role = split_key(key)
        if role is None:
            extras.append(key)
            continue
        prefix, kind = role
        module = modules.setdefault(prefix, _Module())
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


def _check_known(modules: Mapping[str, _Module]) -> None:
    unknown = [p for p in modules if _targets(p) is None]
    if unknown:
        raise ValueError(f"{len(unknown)} unrecognised LoRA modules, e.g. {unknown[:3]}")


def _convert_module(prefix: str, m: _Module) -> list[tuple[str, tuple[Tensor, Tensor]]]:
    """One module's canonical layer(s): alpha/rank folded into B, a fused B split by rows."""
    parts, swap = _targets(prefix)
    a, b = m.down.to(torch.float32), m.up.to(torch.float32)
    if m.alpha is not None:
        b = b * (m.alpha / a.shape[0])
    if swap:
        b = swap_halves(b)
    sizes = fused_part_sizes(len(parts), b.shape[0], a.shape[1])
    rows = torch.split(b, sizes, dim=0)
    return [(part, (a, r)) for part, r in zip(parts, rows, strict=True)]


def _convert(modules: Mapping[str, _Module]) -> Layers:
    """Our own conversion: name map, alpha/rank folded into B, fused layers split by B's rows."""
    _check_known(modules)
    layers: Layers = {}
    for prefix, m in modules.items():
        for part, factors in _convert_module(prefix, m):
            if part in layers:
                raise ValueError(f"layer {part} is given twice")
            layers[part] = factors
    return layers


def _via_diffusers(tensors: Mapping[str, Tensor]) -> Layers:
    from diffusers import FluxPipeline

    # float32 copies: the converters pop keys, scale in place and would round in float16.
    copy = {k: v.to(torch.float32, copy=True) for k, v in tensors.items()}
    state, alphas = FluxPipeline.lora_state_dict(copy, return_alphas=True)
    modules, _ = _group({**state, **(alphas or {})})
    return _convert(modules)


def _probe(a: Tensor, b: Tensor) -> Tensor:
    return b.double() @ (a.double() @ _signs(a.shape[1], 1)[:, 0])


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


def _name_map_agrees(modules: Mapping[str, _Module], theirs: Layers) -> bool:
    """Whether ``_convert(modules)`` has the same layers as ``theirs`` and each the same ``ΔW x``.

    Raises ``ValueError`` exactly where ``_convert`` does. Converts one module at a time and drops
    it after the comparison, so no float32 copy of the whole LoRA is made on the usual path.
    """
    return _name_map_agrees_on(modules, theirs, set(modules))


# Modules whose ΔW is probed on the cheap check (besides those named below): a few picked by a
# hash of the prefix, so the choice is deterministic for a file.
_PROBED_MODULES = 4


def _probe_set(modules: Mapping[str, _Module]) -> set[str]:
    """The modules whose ΔW :func:`_convert_checked` compares with diffusers' result.

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


def _name_map_agrees_on(modules: Mapping[str, _Module], theirs: Layers, probed: set[str]) -> bool:
    """Same layer names and ΔW shapes as ``_convert(modules)`` everywhere, and the same
    ``ΔW x`` on the modules in ``probed``. Raises ``ValueError`` exactly where ``_convert`` does."""
    _check_known(modules)
    seen: set[str] = set()
    agree = True
    for prefix, m in modules.items():
        if prefix in probed:
            converted = _convert_module(prefix, m)
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


def _own(t: Tensor, taken: set[int]) -> Tensor:
    """``t`` if it is contiguous and alone in a storage no input or earlier layer uses, else a
    contiguous copy; either way the result shares memory with nothing else handed out."""
    storage = t.untyped_storage()
    ptr = storage.data_ptr()
    if (ptr and ptr not in taken and t.is_contiguous() and t.storage_offset() == 0
            and storage.nbytes() == t.numel() * t.element_size()):
        taken.add(ptr)
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _compact(a: Tensor, b: Tensor, taken: set[int]) -> tuple[Tensor, Tensor]:
    """Drop rank components that are exactly zero (zero-padded fused parts). The result shares
    memory with nothing in ``taken`` (storages of the input and of layers already handed out)."""
    keep = (a.abs().sum(dim=1) > 0) & (b.abs().sum(dim=0) > 0)  # (Tensor.any(dim) is ~5x slower)
    if bool(keep.all()):  # nothing to drop: indexing columns would be a slow needless copy
        return _own(a, taken), _own(b, taken)
    return a[keep].contiguous(), b[:, keep].contiguous()


def _peft_scale(metadata: Mapping[str, str]) -> Callable[[str], float] | None:
    """Per-layer ``lora_alpha / r`` from diffusers' ``lora_adapter_metadata`` (a PEFT config)."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return None
    if not isinstance(config, dict) or not config:
        return None

    def pattern(patterns: Mapping[str, float], module: str, default: float) -> float:
        hits = (v for k, v in patterns.items() if re.fullmatch(rf"(.*\.)?({k})", module))
        return next(hits, default)

    def scale(name: str) -> float:
        te = name.startswith("text_encoder.")
        owner, module = name.split(".", 1) if te else ("transformer", name)
        cfg = {k: config.get(f"{owner}.{k}", config.get(k))
               for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")}
        if cfg["r"] is None or cfg["lora_alpha"] is None:
            return 1.0
        r = pattern(cfg["rank_pattern"] or {}, module, cfg["r"])
        alpha = pattern(cfg["alpha_pattern"] or {}, module, cfg["lora_alpha"])
        return alpha / (math.sqrt(r) if cfg["use_rslora"] else r)

    return scale


_OTHER_KINDS = {  # code -> (what it is, key marks)
    "dora": ("DoRA (weight-decomposed LoRA)", ("dora_scale", "lora_magnitude", ".magnitude")),
    "lokr": ("LoKr (Kronecker-product LyCORIS)", ("lokr_w1", "lokr_w2", "lokr_t2")),
    "loha": ("LoHa (Hadamard-product LyCORIS)", ("hada_w1", "hada_w2", "hada_t1")),
}


def _check_kind(tensors: Mapping[str, Tensor],
                metadata: Mapping[str, str]) -> tuple[dict[str, _Module], list[str]]:
    """Refuse all but plain FLUX-family LoRAs; return the validated modules and non-LoRA keys."""
    if not tensors:
        raise RejectedFile("not_lora", "the file holds no tensors")
    for code, (what, marks) in _OTHER_KINDS.items():
        hit = next((k for k in tensors if any(m in k for m in marks)), None)
        if hit is not None:
            raise RejectedFile(code, f"{what} adapters are not supported (key {hit!r}); only "
                                     "plain low-rank LoRA (ΔW = B A) is")
    modules, extras = _group(tensors)
    if not modules:
        weights = [k for k in extras if k.endswith((".weight", ".bias")) and tensors[k].ndim >= 2]
        if weights:
            raise RejectedFile("full_checkpoint", f"no LoRA factors but {len(weights)} plain "
                                                  f"weights (e.g. {weights[0]!r}): a checkpoint")
        raise RejectedFile("not_lora", f"no recognisable LoRA keys (e.g. {extras[0]!r})")
    arch = detect_architecture({k: tuple(v.shape) for k, v in tensors.items()}, metadata)
    if arch in SD_FAMILIES:
        raise RejectedFile("unsupported_architecture", f"this is a {arch} LoRA; only FLUX-family "
                                                       "LoRAs are canonicalised for now")
    if arch != "flux":
        raise RejectedFile("unknown_architecture", "neither keys/shapes nor metadata (ss_base_"
                                                   "model_version, modelspec.architecture) name "
                                                   "a base")
    return modules, extras


def _convert_checked(tensors: Mapping[str, Tensor], modules: Mapping[str, _Module],
                     notes: list[str]) -> Layers:
    """diffusers' conversion, checked against our name map (which wins on failure or mismatch)."""
    try:
        theirs = _via_diffusers(tensors)
    except Exception as exc:  # noqa: BLE001 - third-party converters raise anything (assert, ...)
        failed = f"diffusers: {type(exc).__name__}: {exc}"[:300]
        try:
            mine = _convert(modules)
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
    return _convert(modules)


def canonicalise(tensors: dict[str, Tensor], metadata: Mapping[str, str]) -> CanonicalLoRA:
    """Convert a LoRA state dict (any supported FLUX format) to a :class:`CanonicalLoRA`.

    Raises :class:`~registry.errors.RejectedFile` with a stable ``code`` for everything refused.
    ``tensors`` is not modified.
    """
    metadata = metadata or {}
    modules, extras = _check_kind(tensors, metadata)
    notes = [f"ignored {len(extras)} non-LoRA tensors, e.g. {extras[0]!r}"] if extras else []
    layers = _convert_checked(tensors, modules, notes)
    has_alpha = any(m.alpha is not None for m in modules.values())
    scale = None if has_alpha else _peft_scale(metadata)
    canonical: Layers = {}
    taken = {t.untyped_storage().data_ptr() for t in tensors.values() if isinstance(t, Tensor)}
    for name in sorted(layers):
        a, b = layers[name]
        a, b = a.to(torch.float32), b.to(torch.float32)
        a, b = _compact(a, b * scale(name) if scale else b, taken)  # (b * 1.0: a needless copy)
        if a.shape[0]:
            canonical[name] = (a, b)
    if not canonical:
        raise RejectedFile("zero_lora", "every LoRA update in the file is exactly zero")
    return CanonicalLoRA(canonical, detect_format(tensors), "flux", notes)


# --- fingerprint ------------------------------------------------------------------------------
# The fingerprint hashes what ΔW does, never the factors, so it is invariant to the file format
# and to B -> BM, A -> M^-1 A. With fixed ±1 probes u_m (length d), x_m (length k), m = 1..8, and
# per-layer weights w_lm drawn from the layer name, it sums bilinear forms
#     s_m = sum_l w_lm * u_m^T B_l (A_l x_m)       (O(r(d+k)) per layer, never a d x k matrix)
# and divides by the total Frobenius norm N = sqrt(sum_l ||B_l A_l||^2) (r x r Gram matrices).
# Hashed: sorted layer names and shapes, round(log10 N, 3) and round(s_m / N, 3). Nine O(1)
# numbers at ~3 significant digits: float noise between formats (~1e-7 relative) flips a rounding
# step with probability ~1e-3, while different LoRAs collide with negligible probability.
# fingerprint_features gives the unrounded numbers for a tolerant comparison. Probes come from
# a fixed integer hash (splitmix64), not torch's RNG, so stored fingerprints stay valid.
_FP_PROBES = 8
_FP_VERSION = "autolora-fingerprint-v2"  # v2: factor products in float32 (v1: float64)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@functools.lru_cache(maxsize=64)
def _signs(n: int, probes: int) -> Tensor:
    """Deterministic ±1 matrix ``[n, probes]`` (float64)."""
    rows = np.arange(n, dtype=np.uint64)[:, None] * np.uint64(1 << 20)
    idx = rows + np.arange(probes, dtype=np.uint64)[None, :] + np.uint64(n << 40)
    bits = (_splitmix(idx) >> np.uint64(63)).astype(np.float64)
    return torch.from_numpy(1.0 - 2.0 * bits)


@functools.lru_cache(maxsize=64)
def _signs32(n: int, probes: int) -> Tensor:
    """:func:`_signs` as float32 (±1 is exact in any float type)."""
    return _signs(n, probes).float()


def _layer_weights(name: str) -> Tensor:
    digest = hashlib.sha256(name.encode()).digest()
    return torch.tensor([0.5 + b / 255.0 for b in digest[:_FP_PROBES]], dtype=torch.float64)


def fingerprint_features(lora: CanonicalLoRA) -> tuple[float, list[float]]:
    """``(log10 N, [s_m / N])``: the unrounded numbers :func:`fingerprint` hashes."""
    # The factors are read once, in float32 (a float64 copy of every factor would move 3x more
    # bytes); only the small r x 8 and r x r products are widened to float64 before combining.
    sums = torch.zeros(_FP_PROBES, dtype=torch.float64)
    energy = 0.0
    for name in sorted(lora.layers):
        a, b = (t.float() for t in lora.layers[name])
        u, x = _signs32(b.shape[0], _FP_PROBES), _signs32(a.shape[1], _FP_PROBES)
        ax, bu = (a @ x).double(), (b.T @ u).double()
        sums += _layer_weights(name) * (ax * bu).sum(dim=0)
        energy += float(((b.T @ b).double() * (a @ a.T).double()).sum())
    norm = math.sqrt(max(energy, 1e-300))
    return math.log10(norm), [float(s) / norm for s in sums]


def fingerprint(lora: CanonicalLoRA) -> str:
    """Hex sha256 of the quantised canonical content; equal for the same ΔW in any format."""
    log_norm, features = fingerprint_features(lora)
    lines = [_FP_VERSION, *(f"{n}:{d}x{k}" for n, (d, k) in sorted(lora.shapes().items()))]
    lines.append(",".join(str(round(v * 1000)) for v in [log_norm, *features]))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
