"""BFL Control LoRAs (FLUX.1 Canny/Depth): bare BFL module names with PEFT suffixes on every
linear layer, plus the q/k norm scales (``…norm.query_norm.scale``, no LoRA: ignored) that name
the format. Read only; diffusers' converter for it needs every block (19 + 38)."""

from __future__ import annotations

from registry.lora.formats.spec import PEFT_ROLES, Format, any_key

FORMAT = Format(
    name="bfl_control",
    detect=lambda keys: any_key(keys, lambda k: "query_norm.scale" in k),
    roles=PEFT_ROLES,
    diffusers_on_sample=False,
)
