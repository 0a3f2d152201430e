"""BFL module names with PEFT suffixes: ``diffusion_model.double_blocks.N.img_attn.qkv.lora_A``
(``model.diffusion_model.`` or no prefix read too); no alpha, no text encoder. diffusers'
loader passes these keys through unconverted and then drops them (see
:mod:`registry.lora.conversion`)."""

from __future__ import annotations

from registry.lora.formats.names import BFL_BLOCKS
from registry.lora.formats.spec import PEFT_ROLES, Format, Writer, any_key

PREFIXES = ("diffusion_model.", "model.diffusion_model.")

FORMAT = Format(
    name="bfl_peft",
    detect=lambda keys: any_key(
        keys, lambda k: k.startswith((*PREFIXES, "double_blocks.", "single_blocks."))),
    roles=PEFT_ROLES,
    prefixes=PREFIXES,
    writer=Writer(key=lambda module: "diffusion_model." + module, down=".lora_A.weight",
                  up=".lora_B.weight", fused=BFL_BLOCKS, top=True),
)
