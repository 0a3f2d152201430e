"""``gated`` and ``gated_noglobal``: AutoLoRA's fine-grained gated fusion (``models.fusion.GatedFusion``).

``gated`` runs the k LoRAs and the rank-``rank_global`` global LoRA as gated branches with trained
gates (``GateSet``); ``gated_noglobal`` is the paper's ablation without the global LoRA.  Without
gates the fusion is plain addition (the gates' initialisation).

``GatedSession`` keeps one ``GatedFusion`` attached to a pipeline so that switching LoRA sets
between prompts only copies the new factors into the wrappers (``set_loras`` in place; the base
is never reloaded).  ``apply`` uses the pipeline's open session if there is one, else attaches a
fusion for the block and detaches it on exit.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers import FluxPipeline

from torch import nn

from models.fusion import GatedFusion
from pipelines.fusion_methods.base import FusionMethod, Lora


@dataclass
class GateSet:
    """Trained gate parameters and the fusion settings they were trained with."""

    state: dict[str, torch.Tensor]
    time_features: int = 0
    rank_global: int = 4
    use_global: bool = True
    version: str = "untrained"
    meta: dict = field(default_factory=dict)


def fusion_layers(transformer: nn.Module) -> list[str]:
    """Every ``nn.Linear`` of the transformer.  ``GatedFusion``'s default ("all") wraps the block
    linears only, but LoRAs trained with PEFT's ``proj_out``/``all-linear`` targets also touch the
    top-level ``proj_out`` (and may touch the embedders): wrapped too, so no LoRA layer is dropped."""
    return [name for name, m in transformer.named_modules() if type(m) is nn.Linear]


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transformer -> open GatedSession


def _as_gateset(gates: GateSet | Mapping[str, torch.Tensor] | None) -> GateSet | None:
    if gates is None or isinstance(gates, GateSet):
        return gates
    return GateSet(state=dict(gates))


class GatedSession:
    """One ``GatedFusion`` attached to ``pipe.transformer`` until ``close``; ``activate`` swaps LoRA sets."""

    def __init__(self, pipe: FluxPipeline, gates: GateSet | Mapping[str, torch.Tensor] | None = None) -> None:
        if pipe.transformer in _SESSIONS:
            raise RuntimeError("this pipeline already has an open gated session")
        self.pipe = pipe
        self.gates = _as_gateset(gates)
        self.fusion = GatedFusion(pipe.transformer, fusion_layers(pipe.transformer), time_features=self.gates.time_features if self.gates else 0)
        if self.gates is not None:
            self.fusion.load_gate_state_dict(self.gates.state)
        _SESSIONS[pipe.transformer] = self

    @contextmanager
    def activate(self, loras: Sequence[Lora], use_global: bool | None = None) -> Iterator[FluxPipeline]:
        """``loras`` active (in place) for the block; no LoRA afterwards."""
        loras = [lora for lora in loras if lora]
        if use_global is None:
            use_global = self.gates.use_global if self.gates else True
        rank = self.gates.rank_global if self.gates else 4
        self.fusion.set_loras(loras, use_global=use_global, rank_global=rank)
        try:
            yield self.pipe
        finally:
            self.fusion.clear()

    def close(self) -> None:
        """Put the original linear layers back."""
        if self.fusion.layers:
            self.fusion.detach()
        _SESSIONS.pop(self.pipe.transformer, None)

    def __enter__(self) -> GatedSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_session(pipe: FluxPipeline) -> GatedSession | None:
    """The gated session open on ``pipe``, if any."""
    return _SESSIONS.get(pipe.transformer)


@contextmanager
def _apply(pipe: FluxPipeline, loras: Sequence[Lora], gates, use_global: bool) -> Iterator[FluxPipeline]:
    session = open_session(pipe)
    if session is not None:
        if gates is not None and _as_gateset(gates) is not session.gates:
            session.gates = _as_gateset(gates)
            session.fusion.load_gate_state_dict(session.gates.state)
        with session.activate(loras, use_global):
            yield pipe
        return
    with GatedSession(pipe, gates) as session, session.activate(loras, use_global):
        yield pipe


@contextmanager
def apply(pipe: FluxPipeline, loras: Sequence[Lora], gates: GateSet | Mapping | None = None) -> Iterator[FluxPipeline]:
    """Gated fusion of ``loras`` + the global LoRA, with ``gates`` (None: untrained = plain addition)."""
    with _apply(pipe, loras, gates, True):
        yield pipe


@contextmanager
def apply_noglobal(pipe: FluxPipeline, loras: Sequence[Lora],
                   gates: GateSet | Mapping | None = None) -> Iterator[FluxPipeline]:
    """Gated fusion of ``loras`` alone (no global LoRA branch): the paper's ablation."""
    with _apply(pipe, loras, gates, False):
        yield pipe


METHOD = FusionMethod("gated", apply, "AutoLoRA gated fusion + global LoRA (trained gates)", needs_gates=True)
METHOD_NOGLOBAL = FusionMethod("gated_noglobal", apply_noglobal, "gated fusion without the global LoRA",
                               needs_gates=True)
