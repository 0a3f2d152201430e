"""diffusers / PEFT as saved by diffusers: canonical names under ``transformer.`` (CLIP-L under
``text_encoder.``), ``lora_A``/``lora_B`` (older files: ``lora.down``/``lora.up``, or the
attention-processor ``lora_linear_layer.down``/``up``), an optional ``.alpha``."""

from __future__ import annotations

from registry.lora.formats.names import TEXT_ENCODER
from registry.lora.formats.spec import ALPHA, PEFT_ROLES, Format, Writer, any_key

FORMAT = Format(
    name="diffusers",
    detect=lambda keys: any_key(keys, lambda k: k.startswith(("transformer.", TEXT_ENCODER))),
    roles=(*PEFT_ROLES, (".lora.down.weight", "down"), (".lora.up.weight", "up"),
           (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
           *ALPHA),
    prefixes=("transformer.",),
    te_prefixes=(TEXT_ENCODER,),
    writer=Writer(key=lambda module: "transformer." + module, down=".lora_A.weight",
                  up=".lora_B.weight", te_key=lambda rest: TEXT_ENCODER + rest, alpha="optional"),
)
