"""OneTrainer: diffusers module names with dots as ``_`` under ``lora_transformer_`` (CLIP-L
under ``lora_te1_``), kohya's ``lora_down``/``lora_up`` + ``.alpha``."""

from __future__ import annotations

from registry.lora.formats.names import u
from registry.lora.formats.spec import KOHYA_ROLES, Format, Writer, any_key

FORMAT = Format(
    name="onetrainer",
    detect=lambda keys: any_key(keys, lambda k: k.startswith("lora_transformer_")),
    roles=KOHYA_ROLES,
    prefixes=("lora_transformer_",),
    te_prefixes=("lora_te1_",),
    writer=Writer(key=lambda module: "lora_transformer_" + u(module), down=".lora_down.weight",
                  up=".lora_up.weight", te_key=lambda rest: "lora_te1_" + u(rest),
                  alpha="always"),
)
