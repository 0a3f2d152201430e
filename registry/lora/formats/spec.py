"""What a format module declares: how a file of it is recognised, read and written.

Each ``registry/lora/formats/<name>.py`` defines one :class:`Format`; the package
(:mod:`registry.lora.formats`) keeps them in detection order and composes their key spellings
into one reader. Reading is deliberately lenient: every format's prefixes and suffixes are
understood in every file (mixed files exist), the detected name is a label.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from registry.lora.formats.fused import fuse
from registry.lora.formats.names import TEXT_ENCODER, BlockNames

Tensor = torch.Tensor
LayerFactors = Mapping[str, tuple[Tensor, Tensor]]
Roles = tuple[tuple[str, str], ...]  # key suffix -> "down" (A) | "up" (B) | "alpha"

ALPHA: Roles = ((".alpha", "alpha"),)
PEFT_ROLES: Roles = ((".lora_A.weight", "down"), (".lora_B.weight", "up"))
KOHYA_ROLES: Roles = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), *ALPHA)


@dataclass(frozen=True)
class Writer:
    """How a format stores canonical layers (``name -> (A, B)``, ``ΔW = B A``).

    ``key`` gives the key prefix of a module (a canonical name, or with ``fused`` the fused
    module's name), ``te_key`` that of a CLIP-L layer from its name after ``text_encoder.``
    (``None``: the format has no text-encoder names). ``alpha``: ``always`` written (kohya
    style), ``optional`` (only when asked for) or ``never``. ``fused``: names of fused modules
    inside BFL blocks to group the parts into (``top``: top-level layers under BFL names too).
    """

    key: Callable[[str], str]
    down: str
    up: str
    te_key: Callable[[str], str] | None = None
    alpha: str = "never"
    fused: BlockNames | None = None
    top: bool = False


@dataclass(frozen=True)
class Format:
    """One LoRA file format.

    ``detect(keys)``: whether a file's keys are in this format (tried in the package's order).
    ``roles``: key suffixes naming A, B and alpha; ``prefixes``: module prefixes stripped before
    the name lookup; ``te_prefixes``: prefixes under which CLIP-L layers sit; ``block_names``:
    module names inside BFL blocks that only this format uses. ``diffusers_on_sample``: whether
    diffusers' converter for the format works on a few of a file's modules (the cross-check in
    :mod:`registry.lora.conversion`; ``False`` where it needs every block). ``writer``: ``None``
    for formats that are only read.
    """

    name: str
    detect: Callable[[Sequence[str]], bool]
    roles: Roles
    prefixes: tuple[str, ...] = ()
    te_prefixes: tuple[str, ...] = ()
    block_names: BlockNames = field(default_factory=dict)
    diffusers_on_sample: bool = True
    writer: Writer | None = None

    def _file_key(self, module: str) -> str:
        w = self.writer
        if module.startswith(TEXT_ENCODER):
            if w.te_key is None:
                raise ValueError(f"text-encoder layer {module!r} cannot be written in the "
                                 f"{self.name} format")
            return w.te_key(module[len(TEXT_ENCODER):])
        return w.key(module)

    def write(self, lora_layers: LayerFactors, alpha: float | None = None) -> dict[str, Tensor]:
        """The state dict of ``lora_layers`` in this format (see
        :func:`registry.lora.formats.to_format`)."""
        w = self.writer
        if w is None:
            raise ValueError(f"the {self.name} format is read, never written")
        if alpha is not None and w.alpha == "never":
            raise ValueError(f"the {self.name} format has no alpha")
        modules = dict(lora_layers)
        if w.fused is not None:
            te = {n: f for n, f in lora_layers.items() if n.startswith(TEXT_ENCODER)}
            rest = {n: f for n, f in lora_layers.items() if n not in te}
            modules = fuse(rest, w.fused, top=w.top, fmt=self.name) | te
        state: dict[str, Tensor] = {}
        for module, (a, b) in modules.items():
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"{module}: A {tuple(a.shape)} and B {tuple(b.shape)} are no LoRA")
            key = self._file_key(module)
            if w.alpha == "always" or alpha is not None:
                value = float(alpha) if alpha is not None else float(a.shape[0])
                b = b * (a.shape[0] / value)
                state[key + ".alpha"] = torch.tensor(value, dtype=torch.float32)
            state[key + w.down] = a.contiguous()
            state[key + w.up] = b.contiguous()
        return state


def any_key(keys: Sequence[str], test: Callable[[str], bool]) -> bool:
    """Whether ``test`` holds for some key (the detectors' building block)."""
    return any(test(k) for k in keys)


def has_down_up(keys: Sequence[str]) -> bool:
    """kohya-style ``lora_down``/``lora_up`` anywhere in the keys (kohya, ComfyUI)."""
    return any_key(keys, lambda k: "lora_down" in k or "lora_up" in k)
