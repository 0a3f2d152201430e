"""Fusion methods behind one interface, selectable by name: ``get(name).apply(pipe, loras, gates=None)``
is a context manager that fuses canonical LoRAs into ``pipe`` and leaves the base clean on exit."""

from __future__ import annotations

from pipelines.fusion_methods import dare, gated, klora, linear, none, ties
from pipelines.fusion_methods.base import FusionMethod, Lora
from pipelines.fusion_methods.gated import GatedSession, GateSet

METHODS: dict[str, FusionMethod] = {m.name: m for m in (
    none.METHOD, linear.METHOD, ties.METHOD, dare.METHOD, klora.METHOD, gated.METHOD, gated.METHOD_NOGLOBAL)}


def get(name: str) -> FusionMethod:
    """The method called ``name`` (``KeyError`` listing the known names otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown fusion method {name!r}; known: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "FusionMethod", "GateSet", "GatedSession", "Lora", "get"]
