"""The k LoRA branches of one layer packed so that their outputs are two matmuls, not k.

Ranks are padded to the largest (zero rows of A, zero columns of B: the padding adds exactly 0):
``a`` [n·r, k] stacks the A's, so ``z = h a^T`` is every branch's down-projection at once; ``b``
[d, n, r] holds the B's side by side (B_s = [B_1 … B_n] is its [d, n·r] view), so one batched matmul
gives all n outputs [n, M, d] (B_i^T read as a transposed view), and the plain sum Σ_i B_i A_i h is
``z @ B_s^T``, a single matmul.  B is kept as files store it ([d, r] rows): copying a B into a
transposed layout took 90-300 us per FLUX-width factor against ~7 us for this one, most of a
switch.  The buffers are reused (filled in place) whenever a new set has the same count and padded
rank.

Each branch's LayerNorm statistics come from z alone (written by hand, no library does this):
mean(B z) = z·m with m = B^T 1 / d, and mean((B z)^2) = z^T (B^T B / d) z, so the gate never needs
a pass over the large [n, M, d] outputs to normalise them.  They are computed in float64 (tiny
tensors), so the subtraction E[L²] - μ² keeps its precision.  Small outputs (≤ ``DIRECT_STATS``
values, e.g. the demo model's) are normalised directly (one ``layer_norm``): ops are what costs there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DIRECT_STATS = 1 << 20


class LoraBranches:
    """Packed LoRA factors (A_i [r_i, k], B_i [d, r_i]) of one layer, as plain tensors (no gradients)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.a: torch.Tensor | None = None  # [n * r, k]
        self.b: torch.Tensor | None = None  # [d, n, r]
        self.moments: torch.Tensor | None = None  # [n, r, r + 1]: [B_i^T B_i / d | -B_i^T 1 / d] (float64)
        self.count = 0
        self.rank = 0

    def pack(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor]], *, dtype: torch.dtype,
             device: torch.device, rank: int = 0, reserve: int = 0) -> bool:
        """Load ``factors`` (padded to max(rank, their ranks)), then ``reserve`` zero branches (to be
        filled by :meth:`fill_truncated_sum`); True if the old buffers were reused."""
        k, d = self.in_features, self.out_features
        n = len(factors) + reserve
        r = max([rank, *(a.shape[0] for a, _ in factors)]) if factors else 0
        for a, b in factors:
            if a.shape[1] != k or b.shape[0] != d or a.shape[0] != b.shape[1]:
                raise ValueError(f"LoRA factors A{tuple(a.shape)} B{tuple(b.shape)} do not fit a "
                                 f"{k} -> {d} layer")
        reuse = (self.a is not None and (self.count, self.rank) == (n, r)
                 and self.a.dtype == dtype and self.a.device == device)
        # normal tensors even when called under inference_mode: training may use them later
        with torch.inference_mode(False), torch.no_grad():
            if not reuse:
                self.a = torch.empty(n * r, k, dtype=dtype, device=device)
                self.b = torch.empty(d, n, r, dtype=dtype, device=device)
            self.count, self.rank = n, r
            a3 = self.a.view(n, r, k)
            for i, (a, b) in enumerate(factors):
                ri = a.shape[0]
                a3[i, :ri].copy_(a)
                self.b[:, i, :ri].copy_(b)
                if ri < r:
                    a3[i, ri:].zero_()
                    self.b[:, i, ri:].zero_()
            a3[len(factors):].zero_()
            self.b[:, len(factors):].zero_()
            self.moments = None  # made on first use by ``stats`` (only large outputs need them)
        return reuse

    def sum_grams(self, count: int, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_s^T B_s, A_s A_s^T) [count·r, count·r] of the first ``count`` branches, in ``work`` dtype:
        B_s = [B_1 … B_count] and A_s = [A_1; …; A_count] are views of the packed buffers (no copy)."""
        b_s, a_s = self._stacked(count, work)
        return b_s.mT @ b_s, a_s @ a_s.mT

    def fill_truncated_sum(self, count: int, left_a: torch.Tensor, right_b: torch.Tensor, work: torch.dtype) -> None:
        """Make branch ``count`` (a reserved one) the truncation A = left_a A_s, B = B_s right_b of the
        first ``count`` branches' sum (maps from :func:`models.fusion.global_lora.truncation_maps`)."""
        b_s, a_s = self._stacked(count, work)
        r = left_a.shape[0]
        with torch.inference_mode(False), torch.no_grad():
            self.a[count * self.rank: count * self.rank + r].copy_(left_a.to(a_s.dtype) @ a_s)
            # (right_b^T B_s^T)^T: the same product, ~3x faster than B_s @ right_b (a [d, R] @ [R, r] product
            # with r ≈ 4 runs far below the BLAS peak on CPU)
            self.b[:, count, :r].copy_((right_b.mT.to(b_s.dtype) @ b_s.mT).mT)
            self.moments = None

    def _stacked(self, count: int, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_s [d, count·r], A_s [count·r, k]) of the first ``count`` branches: views unless cast."""
        n_r = count * self.rank
        return (self.b[:, :count].reshape(self.out_features, n_r).to(work), self.a[:n_r].to(work))

    def clear(self) -> None:
        """Drop the buffers."""
        self.a = self.b = self.moments = None
        self.count = self.rank = 0

    def project(self, h: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Down-projections of the first ``count`` branches: h [M, k] -> z [M, count·r]."""
        count = self.count if count is None else count
        return F.linear(h, self.a[: count * self.rank])

    def outputs(self, z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Every branch's output B_i (A_i h) from z [M, n·r] -> [n, M, d] (one batched matmul)."""
        m = z.shape[0]
        return torch.bmm(z.view(m, self.count, self.rank).transpose(0, 1), self.b.permute(1, 2, 0), out=out)

    def stats(self, z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """LayerNorm (rstd, shift) [n, M, 1] of every branch output, or None when the outputs are small
        enough (≤ ``DIRECT_STATS`` values) to be normalised directly."""
        if z.shape[0] * self.count * self.out_features <= DIRECT_STATS:
            return None
        r = self.rank
        if self.moments is None:
            with torch.inference_mode(False), torch.no_grad():
                b64 = self.b.to(torch.float64).permute(1, 2, 0)  # [n, r, d]
                self.moments = torch.cat([b64 @ b64.transpose(1, 2), -b64.sum(-1, keepdim=True)], -1).div_(
                    self.out_features)
        zt = z.view(z.shape[0], self.count, r).transpose(0, 1).to(torch.float64)  # [n, M, r]
        q = torch.bmm(zt, self.moments)                                           # [n, M, r + 1]
        neg_mean = q[..., r:]
        var = torch.addcmul(torch.linalg.vecdot(q[..., :r], zt).unsqueeze(-1), neg_mean, neg_mean, value=-1)
        rstd = torch.rsqrt(var.clamp_min(0) + eps)
        return rstd.to(z.dtype), (neg_mean * rstd).to(z.dtype)

    def summed_weight(self, count: int | None = None) -> torch.Tensor:
        """[B_1 … B_count]^T as one [count·r, d] matrix (a transposed view)."""
        count = self.count if count is None else count
        return self.b[:, :count].reshape(self.out_features, count * self.rank).mT

    def summed(self, z: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Σ_i B_i (A_i h) over the first ``count`` branches from z [M, count·r] -> [M, d] (one matmul)."""
        return z @ self.summed_weight(count)
