"""What every fusion method shares: the LoRA type, the method record, and diffusers adapter loading.

A method is ``apply(pipe, loras, gates=None)``: a context manager that makes ``loras`` (canonical
``{module path: (A [r, k], B [d, r])}``, ΔW = B A) act together on ``pipe.transformer`` and leaves
the base exactly as it found it on exit (no PEFT layer, no wrapper, no adapter config left).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxPipeline

from registry.lora.formats import to_format

Lora = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
ApplyFn = Callable[..., AbstractContextManager[FluxPipeline]]
ADAPTER_PREFIX = "autolora_fuse"


@dataclass(frozen=True)
class FusionMethod:
    """A named fusion method: ``apply(pipe, loras, gates=None)`` is a context manager."""

    name: str
    apply: ApplyFn
    description: str
    needs_gates: bool = False


def remove_peft(pipe: FluxPipeline, names: Sequence[str]) -> None:
    """Delete the adapters ``names``; unload PEFT's layers entirely when no other adapter is left."""
    tr = pipe.transformer
    if names:
        pipe.delete_adapters(list(names))
    if not getattr(tr, "peft_config", None):
        if getattr(tr, "_hf_peft_config_loaded", False) or _has_peft_layers(tr):
            tr.unload_lora()
        if hasattr(tr, "peft_config"):
            del tr.peft_config
        tr._hf_peft_config_loaded = False


def _has_peft_layers(module: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


@contextmanager
def diffusers_adapters(pipe: FluxPipeline, loras: Sequence[Lora],
                       weights: Sequence[float] | None = None) -> Iterator[list[str]]:
    """Load ``loras`` through diffusers' own loader (``load_lora_adapter``, as ``load_lora_weights``
    does for FLUX transformer keys) and activate them with ``set_adapters`` at ``weights`` (default 1)."""
    names: list[str] = []
    try:
        for i, lora in enumerate(loras):
            name = f"{ADAPTER_PREFIX}{i}"
            pipe.transformer.load_lora_adapter(to_format(dict(lora), "diffusers"), prefix="transformer",
                                               adapter_name=name)
            names.append(name)
        if names:
            pipe.set_adapters(names, list(weights) if weights is not None else [1.0] * len(names))
        yield names
    finally:
        remove_peft(pipe, names)


def transformer_state(pipe: FluxPipeline) -> dict[str, Any]:
    """The transformer's parameters and module types (to check that a method left the base clean)."""
    tr = pipe.transformer
    return {"params": {k: v.detach().clone() for k, v in tr.state_dict().items()},
            "types": {k: type(m).__name__ for k, m in tr.named_modules()}}
