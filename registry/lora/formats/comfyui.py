"""ComfyUI: dotted BFL module names under ``diffusion_model.`` (fused ``qkv`` and ``linear1``),
CLIP-L under ``text_encoders.clip_l.transformer.``, kohya's ``lora_down``/``lora_up`` and
``.alpha``."""

from __future__ import annotations

from registry.lora.formats.names import BFL_BLOCKS
from registry.lora.formats.spec import KOHYA_ROLES, Format, Writer, any_key, has_down_up

_TE = "text_encoders.clip_l.transformer."

FORMAT = Format(
    name="comfyui",
    detect=lambda keys: has_down_up(keys)
    and any_key(keys, lambda k: k.startswith("diffusion_model.")),
    roles=KOHYA_ROLES,
    prefixes=("diffusion_model.",),
    te_prefixes=(_TE,),
    writer=Writer(key=lambda module: "diffusion_model." + module, down=".lora_down.weight",
                  up=".lora_up.weight", te_key=lambda rest: _TE + rest, alpha="always",
                  fused=BFL_BLOCKS, top=True),
)
