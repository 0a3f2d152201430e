"""Weights fingerprint of a canonical LoRA: equal for the same ΔW in any file format."""

from __future__ import annotations

import functools
import hashlib
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from registry.canonical import CanonicalLoRA

Tensor = torch.Tensor


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
def signs(n: int, probes: int) -> Tensor:
    """Deterministic ±1 matrix ``[n, probes]`` (float64)."""
    rows = np.arange(n, dtype=np.uint64)[:, None] * np.uint64(1 << 20)
    idx = rows + np.arange(probes, dtype=np.uint64)[None, :] + np.uint64(n << 40)
    bits = (_splitmix(idx) >> np.uint64(63)).astype(np.float64)
    return torch.from_numpy(1.0 - 2.0 * bits)


@functools.lru_cache(maxsize=64)
def _signs32(n: int, probes: int) -> Tensor:
    """:func:`signs` as float32 (±1 is exact in any float type)."""
    return signs(n, probes).float()


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
