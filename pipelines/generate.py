"""Generation: retrieve the top-k LoRAs for a prompt, add their trigger words, fuse, render.

``Generator`` holds one base pipeline for its lifetime.  With a gated method it keeps one
``GatedSession`` attached, so a new LoRA set for the next prompt is copied into the wrappers in
place (``GatedFusion.set_loras``); the base is never reloaded.  Loaded LoRAs are cached by id.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from diffusers import FluxPipeline

from pipelines.fusion_methods import GatedSession, GateSet, get
from pipelines.fusion_methods.base import Lora

GATED = ("gated", "gated_noglobal")


@dataclass
class Generation:
    """What one call rendered and with what."""

    images: np.ndarray                 # (N, H, W, 3) uint8
    prompt: str                        # the prompt as rendered (trigger words added)
    lora_ids: list[str]
    method: str
    hits: list[dict] = field(default_factory=list)  # retrieval hits (empty when LoRAs were given)


@dataclass(frozen=True)
class RenderSettings:
    """How the Generator renders: denoising steps, square image size, true CFG (> 1: against an
    empty prompt) and a guidance-distilled base's guidance scale."""

    steps: int
    size: int
    true_cfg: float
    guidance: float | None = None

    @classmethod
    def for_base(cls, pipe: FluxPipeline) -> RenderSettings:
        """FLUX.1-dev's usual settings for a FLUX.1-width transformer (3072), else the demo
        world sampler's (its tiny base is trained for 32 px, 12 steps, true CFG 1.5)."""
        from pipelines.world.sampling import CFG, STEPS

        config = pipe.transformer.config
        if config.num_attention_heads * config.attention_head_dim == FLUX1_WIDTH:
            return cls(steps=28, size=1024, true_cfg=1.0, guidance=3.5)
        return cls(steps=STEPS, size=32, true_cfg=CFG)


FLUX1_WIDTH = 3072


def load_base(source: FluxPipeline | str | Path) -> FluxPipeline:
    """A pipeline as is, a diffusers pipeline folder, or a demo world folder (its ``base/``)."""
    if isinstance(source, FluxPipeline):
        return source
    path = Path(source)
    if (path / "world.json").is_file():
        path = path / "base"
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_triggers(prompt: str, triggers: Sequence[str]) -> str:
    """``prompt`` with the trigger words it lacks put in front (in order, each once)."""
    missing = []
    for t in triggers:
        if t and t.lower() not in prompt.lower() and t not in missing:
            missing.append(t)
    return ", ".join([*missing, prompt]) if missing else prompt


class Generator:
    """Prompt -> retrieved LoRAs -> fused generation on one base held for the object's lifetime."""

    def __init__(self, registry, base: FluxPipeline | str | Path, gates: GateSet | str | Path | None = None,
                 method: str = "gated", render: RenderSettings | None = None) -> None:
        from pipelines.train_gates import load_gates

        self.registry = registry
        self.pipe = load_base(base)
        self.settings = render or RenderSettings.for_base(self.pipe)
        self.gates = load_gates(gates) if isinstance(gates, (str, Path)) else gates
        self.method = get(method).name
        self._loras: dict[str, Lora] = {}
        self._session: GatedSession | None = None

    def retrieve(self, prompt: str, k: int) -> list:
        """The registry's top-``k`` hits for ``prompt``."""
        return list(self.registry.search(prompt, k=k))

    def lora(self, lora_id: str) -> Lora:
        """A registry LoRA as canonical float32 layers (loaded once)."""
        from registry.lora.inspect import load_canonical

        if lora_id not in self._loras:
            if self.registry.get(lora_id) is None:
                raise KeyError(f"no LoRA {lora_id!r} in the registry")
            self._loras[lora_id] = load_canonical(self.registry.blob_path(lora_id), self.registry.bases())[0].layers
        return self._loras[lora_id]

    def triggers(self, lora_id: str) -> list[str]:
        row = self.registry.get(lora_id) or {}
        words = row.get("trigger_words") or []
        return [str(w) for w in (json.loads(words) if isinstance(words, str) else words)]

    def _fusion(self, method: str):
        if method in GATED:
            if self._session is None:
                self._session = GatedSession(self.pipe, self.gates)
        elif self._session is not None:  # diffusers/PEFT methods need the plain linear layers back
            self._session.close()
            self._session = None
        return get(method)

    def generate(self, prompt: str, *, k: int = 3, lora_ids: Sequence[str] | None = None,
                 method: str | None = None, seed: int = 0, n: int = 1, add_triggers: bool = True) -> Generation:
        """Render ``n`` images of ``prompt`` with ``lora_ids`` (default: the top-``k`` retrieved)."""
        method = method or self.method
        hits: list[dict] = []
        if lora_ids is None:
            found = self.retrieve(prompt, k) if k > 0 else []
            hits = [h.to_dict() for h in found]
            ids, triggers = [h.lora_id for h in found], [w for h in found for w in h.trigger_words]
        else:
            ids = list(lora_ids)
            triggers = [w for i in ids for w in self.triggers(i)]
        text = with_triggers(prompt, triggers) if add_triggers else prompt
        return Generation(self.render([text] * n, ids, seed, method), text, ids, method, hits)

    def render(self, prompts: Sequence[str], lora_ids: Sequence[str], seed: int = 0,
               method: str | None = None) -> np.ndarray:
        """Render ``prompts`` (as given) in one batch with ``lora_ids`` fused by ``method``."""
        from pipelines.world.sampling import generate

        loras = [self.lora(i) for i in lora_ids]
        with self._fusion(method or self.method).apply(self.pipe, loras, gates=self.gates):
            r = self.settings
            return generate(self.pipe, list(prompts), seed, steps=r.steps, cfg=r.true_cfg, size=r.size,
                            guidance=r.guidance)

    def close(self) -> None:
        """Detach the gated fusion (the base is exactly as loaded)."""
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
