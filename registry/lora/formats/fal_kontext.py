"""fal / FLUX.1 Kontext trainer: BFL module names with PEFT suffixes under
``base_model.model.``. Read only; diffusers' converter for it needs every block (19 + 38)."""

from __future__ import annotations

from registry.lora.formats.spec import PEFT_ROLES, Format, any_key

FORMAT = Format(
    name="fal_kontext",
    detect=lambda keys: any_key(keys, lambda k: k.startswith("base_model.model.")),
    roles=PEFT_ROLES,
    prefixes=("base_model.model.",),
    diffusers_on_sample=False,
)
