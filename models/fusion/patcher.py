"""Gated fusion attached in place to a loaded diffusers ``FluxTransformer2DModel``.

Every chosen block linear is replaced by a ``FusedLinear`` (the original layer inside, its gate,
the current LoRA branches).  Switching LoRAs copies the new factors into the wrappers' buffers: the
base is never reloaded.  LoRAs are canonical: ``{module path: (A [r, k], B [d, r])}``, ΔW = B A.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from models.fusion.fused_linear import MODES, FusedLinear, Mode, SharedState
from models.fusion.gate import FusionGate, timestep_features
from models.fusion.global_lora import truncation_maps
from models.torch_threads import one_torch_thread

Lora = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def block_linear_names(transformer: nn.Module) -> list[str]:
    """Every ``nn.Linear`` inside the double and single blocks (attention, ff, proj_mlp, proj_out, norms)."""
    return [name for name, m in transformer.named_modules()
            if type(m) is nn.Linear and name.startswith(BLOCK_PREFIXES)]


class GatedFusion:
    """Wraps ``layers`` of ``transformer`` ("all" = every block linear) with gates, in place."""

    def __init__(self, transformer: nn.Module, layers: Sequence[str] | str = "all", *,
                 mode: Mode = "gated", time_features: int = 0, gate_dtype: torch.dtype | None = None) -> None:
        names = block_linear_names(transformer) if layers == "all" else list(layers)
        self.transformer = transformer
        self.shared = SharedState()
        self.time_features = time_features
        self.layers: dict[str, FusedLinear] = {}
        for name in names:
            base = transformer.get_submodule(name)
            if type(base) is not nn.Linear:
                raise TypeError(f"{name} is a {type(base).__name__}, not an nn.Linear")
            w = base.weight
            gate = FusionGate(base.out_features, time_features=time_features, dtype=gate_dtype or w.dtype,
                              device=w.device)
            wrapper = FusedLinear(base, gate, self.shared)
            transformer.set_submodule(name, wrapper)
            self.layers[name] = wrapper
        self._hook = (transformer.register_forward_pre_hook(self._read_timestep, with_kwargs=True)
                      if time_features else None)
        self.mode = mode

    @property
    def mode(self) -> Mode:
        """``gated`` (eq. 6-8) or ``linear`` (x + Σ_i w_i B_i A_i h, the diffusers ``set_adapters`` baseline)."""
        return self._mode

    @mode.setter
    def mode(self, value: Mode) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        self._mode = value
        for layer in self.layers.values():
            layer.mode = value

    def set_loras(self, loras: Sequence[Lora], use_global: bool = True, rank_global: int = 4,
                  weights: Sequence[float] | None = None, strict: bool = True) -> int:
        """Make ``loras`` the active set, replacing the previous one in place; returns how many layers
        reused their buffers.

        ``weights`` scale each LoRA's output (default 1).  A LoRA contributes nothing to a layer it
        does not cover.  With ``use_global`` each covered layer gets the rank-``rank_global``
        truncation of the (weighted) sum as one more gated branch (unused in ``linear`` mode).
        ``strict``: a LoRA layer that is not wrapped is an error (else it is ignored).
        """
        weights = [1.0] * len(loras) if weights is None else list(weights)
        if len(weights) != len(loras):
            raise ValueError(f"{len(weights)} weights for {len(loras)} LoRAs")
        unknown = set().union(*(lora.keys() for lora in loras)) - self.layers.keys()
        if strict and unknown:
            raise KeyError(f"LoRA layers not wrapped by this fusion: {sorted(unknown)[:5]} "
                           f"({len(unknown)} in all)")
        # small-tensor work (copies, 48x48 eigh/SVDs): on 2 busy cores a switch of three rank-16 LoRAs on
        # the FLUX.1-width slice measured 9.2 s on two threads (LAPACK QR then) and 0.36 s on one
        with one_torch_thread():
            return self._set_loras(loras, use_global, rank_global, weights)

    def _set_loras(self, loras: Sequence[Lora], use_global: bool, rank_global: int, weights: list[float]) -> int:
        reused = 0
        groups: dict[tuple, list[FusedLinear]] = {}  # layers whose global LoRAs are truncated together
        for name, layer in self.layers.items():
            dev = layer.base.weight.device
            factors = [(a.to(dev), b.to(dev) if w == 1.0 else b.to(dev) * w)
                       for lora, w in zip(loras, weights) if (ab := lora.get(name)) is not None
                       for a, b in [ab]]
            r_g = min(rank_global, sum(a.shape[0] for a, _ in factors)) if use_global else 0
            reused += layer.set_branches(factors, global_rank=r_g)
            if factors and r_g:
                br = layer.branches
                key = (layer.n_loras, br.rank, r_g, br.a.dtype, dev)  # its Gram matrices' size, whatever d, k
                groups.setdefault(key, []).append(layer)
        for (*_, r_g, dtype, _), layers in groups.items():
            self._fill_global_loras(layers, r_g, torch.float64 if dtype == torch.float64 else torch.float32)
        return reused

    @staticmethod
    def _fill_global_loras(layers: list[FusedLinear], rank: int, work: torch.dtype) -> None:
        """Each layer's global LoRA (its reserved last branch) from the LoRA factors already packed in
        its buffers: the large products read those buffers in place, the small R × R work of every
        layer with the same R is one batched eigh / SVD (per-call overhead is what costs there)."""
        grams = [layer.branches.sum_grams(layer.n_loras, work) for layer in layers]
        left_a, right_b = truncation_maps(torch.stack([g[0] for g in grams]), torch.stack([g[1] for g in grams]),
                                          rank)
        for i, layer in enumerate(layers):
            layer.branches.fill_truncated_sum(layer.n_loras, left_a[i], right_b[i], work)

    def clear(self) -> None:
        """No LoRA active: every wrapped layer returns its base output exactly."""
        for layer in self.layers.values():
            layer.clear()
        self.shared.workspace.clear()

    def detach(self) -> None:
        """Put the original ``nn.Linear`` modules back; this object is empty afterwards."""
        for name, layer in self.layers.items():
            self.transformer.set_submodule(name, layer.base)
        if self._hook is not None:
            self._hook.remove()
        self.layers = {}
        self.shared.workspace.clear()

    def gate_state_dict(self) -> dict[str, torch.Tensor]:
        """Gate parameters keyed ``<layer path>.<param>`` (e.g. ``transformer_blocks.0.attn.to_q.w_x``)."""
        return {f"{name}.{key}": value.detach()
                for name, layer in self.layers.items() for key, value in layer.gate.state_dict().items()}

    def load_gate_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load gate parameters saved by ``gate_state_dict`` (strict: exactly the same keys)."""
        if strict:
            expected = set(self.gate_state_dict())
            missing, extra = expected - state.keys(), state.keys() - expected
            if missing or extra:
                raise KeyError(f"gate state mismatch: missing {sorted(missing)[:3]}, unexpected "
                               f"{sorted(extra)[:3]}")
        for name, layer in self.layers.items():
            prefix = f"{name}."
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if part:
                layer.gate.load_state_dict(part, strict=strict)

    def gate_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters: every wrapped layer's gate."""
        for layer in self.layers.values():
            yield from layer.gate.parameters()

    def prepare_training(self) -> None:
        """Freeze the transformer and let gradients flow into the gates only (LoRA factors are buffers)."""
        self.transformer.requires_grad_(False)
        for p in self.gate_parameters():
            p.requires_grad_(True)

    def _read_timestep(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: features of the transformer's ``timestep`` argument for the gates."""
        t = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        self.shared.features = (None if t is None
                                else timestep_features(torch.as_tensor(t).reshape(-1), self.time_features))
