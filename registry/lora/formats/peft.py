"""Plain PEFT: canonical (diffusers) module names with no prefix, ``lora_A``/``lora_B``. The
fallback label of a file no other format claims; never written."""

from __future__ import annotations

from registry.lora.formats.spec import PEFT_ROLES, Format

FORMAT = Format(name="peft", detect=lambda keys: True, roles=PEFT_ROLES)
