"""Layer tokens of the LoRA-weight encoder: one token per adapted layer, computed from the factors.

A layer's token is ``W_t^T B (A Q)`` (ARCHITECTURE §3): ``Q`` holds ``P`` learned probe vectors,
``W_t`` projects the ``d``-dim responses to ``c`` values each, and ``P·c`` values form the token.
``B A`` is never formed, so a layer costs O(r(d+k)P + dcP). ``Q`` and ``W_t`` belong to the layer's
*module type* (``transformer_blocks.*.attn.to_q``): per-layer projections would be ~10^8+ weights at
FLUX.1 shape. Probes may instead be per layer (the authors' design, ``probe_sharing="layer"``).

Layers of one module type share their shapes, so a batch of LoRAs is encoded with one padded
``bmm`` chain per module type: ranks are zero-padded to the group's largest (a zero rank
component adds nothing to ``B A`` nor to ``B (A Q)``). Hand-written: no library encodes LoRA
factors into tokens.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.torch_threads import one_torch_thread

Factors = tuple[Tensor, Tensor]  # (A [r, k], B [d, r]), ΔW = B @ A
LoRA = Mapping[str, Factors]

_BLOCK_INDEX = re.compile(r"(?<=blocks\.)\d+(?=\.|$)|(?<=layers\.)\d+(?=\.|$)")


@dataclass(frozen=True)
class LayerSpec:
    """A base-model linear layer a LoRA may adapt: diffusers module path and shape."""

    name: str
    d_out: int
    d_in: int


def module_type(name: str) -> str:
    """``name`` with its block indices replaced by ``*`` (``transformer_blocks.3.attn.to_q`` ->
    ``transformer_blocks.*.attn.to_q``); indices inside a block (``ff.net.0.proj``) are kept."""
    return _BLOCK_INDEX.sub("*", name)


@dataclass
class TokenBatch:
    """Tokens of a batch of LoRAs laid out over the encoder's layer list."""

    tokens: Tensor        # [N, L, P*c] responses projected, scale-normalised if asked
    log_rel_norm: Tensor  # [N, L] log(layer RMS / LoRA RMS); 0 where absent
    present: Tensor       # [N, L] bool
    unknown: list[list[str]]  # per LoRA: names not in the layer list or of the wrong shape


class LayerTokenizer(nn.Module):
    """Per-module-type probes and projections; turns LoRA factors into raw layer tokens."""

    def __init__(self, layers: Sequence[LayerSpec], probes: int, probe_dim: int,
                 probe_sharing: str = "type", normalise_scale: bool = True) -> None:
        super().__init__()
        if probe_sharing not in ("type", "layer"):
            raise ValueError(f"probe_sharing must be 'type' or 'layer', not {probe_sharing!r}")
        self.layers = list(layers)
        self.index = {spec.name: i for i, spec in enumerate(self.layers)}
        if len(self.index) != len(self.layers):
            raise ValueError("layer names must be unique")
        self.probes, self.probe_dim = probes, probe_dim
        self.normalise_scale = normalise_scale
        # module type -> its layers' positions; a type's layers must share one shape
        self.types: dict[str, list[int]] = {}
        for i, spec in enumerate(self.layers):
            self.types.setdefault(module_type(spec.name), []).append(i)
        self.type_keys = {t: f"t{j}" for j, t in enumerate(self.types)}  # safe parameter names
        self.probe = nn.ParameterDict()
        self.proj = nn.ParameterDict()
        self._slot: dict[int, int] = {}  # layer position -> its probe set within its type
        for t, members in self.types.items():
            d, k = self.layers[members[0]].d_out, self.layers[members[0]].d_in
            for i in members:
                if (self.layers[i].d_out, self.layers[i].d_in) != (d, k):
                    raise ValueError(f"{self.layers[i].name}: shape differs from its type {t}")
            sets = len(members) if probe_sharing == "layer" else 1
            for s, i in enumerate(members):
                self._slot[i] = s if probe_sharing == "layer" else 0
            key = self.type_keys[t]
            self.probe[key] = nn.Parameter(torch.randn(sets, k, probes))
            self.proj[key] = nn.Parameter(torch.randn(d, probe_dim) / math.sqrt(d))

    def set_probes(self, per_layer: Mapping[str, Tensor]) -> list[str]:
        """Fix the probes of the named layers to given ``[k, P]`` matrices (e.g. the principal
        directions of the base layer's real inputs) and freeze every probe (a layer not named keeps
        its random one, fixed too). Needs per-layer probes (``probe_sharing="layer"``); returns the
        names it set."""
        if any(self.probe[key].shape[0] != len(self.types[t]) for t, key in self.type_keys.items()):
            raise ValueError("fixed probes need per-layer probe sets (probe_sharing='layer')")
        done = []
        with torch.no_grad():
            for name, q in per_layer.items():
                i = self.index.get(name)
                if i is None:
                    continue
                probe = self.probe[self.type_keys[module_type(name)]]
                if tuple(q.shape) != tuple(probe.shape[1:]):
                    raise ValueError(f"{name}: probes {tuple(q.shape)}, expected {tuple(probe.shape[1:])}")
                probe[self._slot[i]].copy_(q)
                done.append(name)
        self.probe.requires_grad_(False)
        return done

    def layer_probes(self) -> dict[str, Tensor]:
        """``{layer name: Q^T [P, k]}``, float32, detached: what a caller needs to make the layers'
        responses itself (:meth:`forward`'s ``responses``), e.g. in a pass it makes over the factors anyway."""
        by_slot: dict[tuple[str, int], Tensor] = {}
        out = {}
        for i, spec in enumerate(self.layers):
            key = self.type_keys[module_type(spec.name)]
            if (key, self._slot[i]) not in by_slot:
                by_slot[key, self._slot[i]] = self.probe[key][self._slot[i]].detach().float().T.contiguous()
            out[spec.name] = by_slot[key, self._slot[i]]
        return out

    @property
    def token_dim(self) -> int:
        """Length of a raw token: probes × probe_dim."""
        return self.probes * self.probe_dim

    def forward(self, loras: Sequence[LoRA], helper: Executor | None = None,
                responses: Sequence[Mapping[str, Tensor]] | None = None) -> TokenBatch:
        """Raw tokens of ``loras`` over the layer list (absent layers are zero and not present).

        ``helper``: an executor whose thread may take module types too, once it is free (a LoRA
        embedded at ingest while its file is still hashed: the hash thread joins when done).
        ``responses``: per LoRA, ``{layer name: (B (A Q))^T [P, d]}`` made by the caller with
        :meth:`layer_probes` (float32); a module type whose every layer has one is not computed
        again. Used without gradients only (they are constants)."""
        n, n_layers = len(loras), len(self.layers)
        device = next(iter(self.proj.values())).device
        tokens = torch.zeros(n, n_layers, self.token_dim, device=device)
        sq_norm = torch.zeros(n, n_layers, device=device)  # mean square of each layer's responses
        present = torch.zeros(n, n_layers, dtype=torch.bool, device=device)
        unknown: list[list[str]] = [[] for _ in loras]
        groups: dict[str, list[tuple[int, int, Tensor, Tensor]]] = {}
        for j, lora in enumerate(loras):
            for name, (a, b) in lora.items():
                i = self.index.get(name)
                spec = self.layers[i] if i is not None else None
                if (spec is None or a.dim() != 2 or b.dim() != 2 or a.shape[1] != spec.d_in
                        or b.shape[0] != spec.d_out or a.shape[0] != b.shape[1]):
                    unknown[j].append(name)
                    continue
                if a.shape[0] == 0:  # a rank-0 layer adapts nothing: the same as absent
                    continue
                groups.setdefault(module_type(name), []).append((j, i, a, b))
        given = {}  # (LoRA, layer position) -> its responses, where the caller made them
        if responses is not None:
            for j, per_layer in enumerate(responses):
                for name, r in per_layer.items():
                    i = self.index.get(name)
                    if i is not None and tuple(r.shape) == (self.probes, self.layers[i].d_out):
                        given[j, i] = r

        def encode_type(t: str, entries: list) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            key = self.type_keys[t]
            constant = not (torch.is_grad_enabled() and self.probe[key].requires_grad)
            if constant and all((j, i) in given for j, i, _, _ in entries):
                response_t = torch.stack([given[j, i] for j, i, _, _ in entries]).to(device)  # [m, P, d]
            else:
                response_t = self._responses_t(key, entries, device)  # [m, P, d]
            z = response_t @ self.proj[key]                            # [m, P, c]
            return (torch.tensor([j for j, _, _, _ in entries], device=device),
                    torch.tensor([i for _, i, _, _ in entries], device=device),
                    z.reshape(len(entries), -1), response_t.square().mean(dim=(1, 2)))

        for rows, cols, z, sq in _shared(encode_type, groups.items(), helper):
            tokens[rows, cols] = z
            sq_norm[rows, cols] = sq
            present[rows, cols] = True
        log_rel = torch.zeros(n, n_layers, device=device)
        if self.normalise_scale:
            lora_ms = (sq_norm.sum(1) / present.sum(1).clamp(min=1)).clamp(min=1e-30)  # [N]
            layer_ms = sq_norm.clamp(min=1e-30)
            tokens = tokens / layer_ms.sqrt().unsqueeze(-1)
            rel = (0.5 * torch.log(layer_ms / lora_ms.unsqueeze(1))).clamp(-15.0, 15.0)
            log_rel = torch.where(present, rel, torch.zeros_like(rel))
        return TokenBatch(tokens=tokens, log_rel_norm=log_rel, present=present, unknown=unknown)

    def _responses_t(self, key: str, entries: list[tuple[int, int, Tensor, Tensor]],
                     device: torch.device) -> Tensor:
        """``(B (A Q))^T`` for every (LoRA, layer) entry of one module type, ranks zero-padded.

        Computed as ``(Q^T A^T) B^T`` on transposed views: a ``[P, k] @ [k, r]`` product runs ~3x
        faster on CPU than the ``[r, k] @ [k, P]`` one of the same numbers (wide, short ``A``).
        bfloat16 factors (most FLUX LoRA files) are multiplied in bfloat16 when no gradient is
        needed (fp32 accumulation, outputs rounded to bf16: ~0.2 % relative), each of A and B on
        its own: no float32 copy of them is made, ~10x faster on a CPU with bf16 instructions (40
        layers of a FLUX LoRA: 1 vs 9.5 ms). Otherwise they are cast to float32 while copied into
        the padded batch."""
        ranks = [a.shape[0] for _, _, a, _ in entries]
        r_max, first_a, first_b = max(ranks), entries[0][2], entries[0][3]
        probe = self.probe[key]
        inference = not (torch.is_grad_enabled() and probe.requires_grad)
        work_a, work_b = (torch.bfloat16 if inference and all(f[k].dtype == torch.bfloat16 for f in entries)
                          else torch.float32 for k in (2, 3))  # per factor: a kohya B is scaled to float32
        alloc = torch.empty if all(r == r_max for r in ranks) else torch.zeros
        a_pad = alloc(len(entries), r_max, first_a.shape[1], device=device, dtype=work_a)
        b_pad = alloc(len(entries), first_b.shape[0], r_max, device=device, dtype=work_b)
        for m, (_, _, a, b) in enumerate(entries):  # one pass per factor (cast while copied)
            a_pad[m, : a.shape[0]].copy_(a)
            b_pad[m, :, : b.shape[1]].copy_(b)
        if probe.shape[0] == 1:
            q_t = probe[0].T.expand(len(entries), -1, -1)                # [m, P, k]
        else:
            slots = torch.tensor([self._slot[i] for _, i, _, _ in entries], device=device)
            q_t = probe[slots].transpose(1, 2)
        aq_t = torch.bmm(q_t.to(work_a), a_pad.transpose(1, 2))          # [m, P, r]
        return torch.bmm(aq_t.to(work_b), b_pad.transpose(1, 2)).float()  # [m, P, d]


def _shared(work: Callable, items: Iterable[tuple], helper: Executor | None) -> list:
    """``[work(*item) for item in items]``, the items taken in turn by this thread and, once it is free,
    ``helper``'s (torch ops drop the GIL: two module types are encoded at once). Written by hand: a
    thread pool's ``map`` would hand items to a helper still busy with other work and wait on it."""
    if helper is None:
        return [work(*item) for item in items]
    pending, lock, done = iter(items), threading.Lock(), []
    grad = torch.is_grad_enabled()

    def take() -> None:
        with torch.set_grad_enabled(grad), one_torch_thread():  # both are per thread
            while True:
                with lock:
                    item = next(pending, None)
                if item is None:
                    return
                done.append(work(*item))

    joined = helper.submit(take)
    take()
    if not joined.cancel():  # it started: wait for its last item
        joined.result()
    return done
