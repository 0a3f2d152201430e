"""A base ``nn.Linear`` wrapped with its fusion gate and the current LoRA branches."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from models.fusion.branches import LoraBranches
from models.fusion.gate import EPS, FusionGate
from models.fusion.workspace import Workspace

Mode = Literal["gated", "linear"]
MODES = ("gated", "linear")


class SharedState:
    """What every wrapped layer of one transformer shares: timestep features and scratch buffers."""

    def __init__(self) -> None:
        self.features: torch.Tensor | None = None
        self.workspace = Workspace()


class FusedLinear(nn.Module):
    """``base(h)`` plus the active LoRA branches, fused by ``gate`` (``gated``) or summed (``linear``).

    With no branch active the output is ``base(h)`` itself.  In ``linear`` mode the global LoRA
    branch (if packed, it is the last) is left out: that mode is the plain-addition baseline.
    """

    def __init__(self, base: nn.Linear, gate: FusionGate, shared: SharedState | None = None) -> None:
        super().__init__()
        self.base = base
        self.gate = gate
        self.branches = LoraBranches(base.in_features, base.out_features)
        self.mode: Mode = "gated"
        self.n_loras = 0          # branches that are LoRAs (the global LoRA, if any, comes after)
        self.has_global = False
        self._shared = shared or SharedState()

    # the attributes code outside may read from the nn.Linear it replaced
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def set_branches(self, factors: list[tuple[torch.Tensor, torch.Tensor]], global_rank: int = 0) -> bool:
        """Load LoRA factors, plus (``global_rank`` > 0) a zero branch last for the global LoRA, which
        the caller fills (``branches.fill_truncated_sum``); True if the buffers were reused in place."""
        w = self.base.weight
        if not factors:
            self.clear()
            return False
        reused = self.branches.pack(factors, dtype=w.dtype, device=w.device, rank=global_rank,
                                    reserve=1 if global_rank else 0)
        self.n_loras, self.has_global = len(factors), bool(global_rank)
        return reused

    def clear(self) -> None:
        """No LoRA: the output is the base layer's."""
        self.branches.clear()
        self.n_loras, self.has_global = 0, False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.base(h)
        if self.n_loras == 0:
            return y
        h2 = h.reshape(-1, h.shape[-1])
        # without autograd, y (a fresh tensor) and the scratch buffers are written in place
        inplace = not torch.is_grad_enabled() or not (y.requires_grad or self.gate.w_x.requires_grad)
        if self.mode == "linear":
            z = self.branches.project(h2, self.n_loras)
            if inplace:
                return y.view(-1, y.shape[-1]).addmm_(z, self.branches.summed_weight(self.n_loras)).view(y.shape)
            return y + self.branches.summed(z, self.n_loras).view(y.shape)
        z = self.branches.project(h2)
        n, shape = self.branches.count, (self.branches.count, *y.shape)
        ws = self._shared.workspace
        out = ws.get("branches", (n, *h2.shape[:-1], y.shape[-1]), y.dtype, y.device) if inplace else None
        outs = self.branches.outputs(z, out=out).view(shape)
        stats = self.branches.stats(z, EPS)
        if stats is not None:
            stats = stats[0].view(*shape[:-1], 1), stats[1].view(*shape[:-1], 1)
        scratch = ws.get("scratch", shape, y.dtype, y.device) if inplace else None
        return self.gate(y, outs, global_last=self.has_global, time_feats=self._shared.features, stats=stats,
                         inplace=inplace, scratch=scratch)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, loras={self.n_loras}, global={self.has_global}"
