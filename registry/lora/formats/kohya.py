"""kohya sd-scripts: BFL module names with dots as ``_`` under ``lora_unet_`` (fused ``qkv`` and
``linear1``), CLIP-L under ``lora_te1_`` (``lora_te_`` read too), ``lora_down``/``lora_up`` and an
``.alpha`` per module (the update is ``alpha / rank * up @ down``)."""

from __future__ import annotations

from registry.lora.formats.names import BFL_BLOCKS, u
from registry.lora.formats.spec import KOHYA_ROLES, Format, Writer, has_down_up

FORMAT = Format(
    name="kohya",
    detect=has_down_up,
    roles=KOHYA_ROLES,
    prefixes=("lora_unet_",),
    te_prefixes=("lora_te_", "lora_te1_"),
    writer=Writer(key=lambda module: "lora_unet_" + u(module), down=".lora_down.weight",
                  up=".lora_up.weight", te_key=lambda rest: "lora_te1_" + u(rest),
                  alpha="always", fused=BFL_BLOCKS, top=True),
)
