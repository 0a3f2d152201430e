"""XLabs (x-flux): LoRA attention processors inside BFL blocks,
``double_blocks.N.processor.qkv_lora1.down.weight`` (``diffusion_model.`` prefix read too).

XLabs adapts attention only: per double block the image (``qkv_lora1``, ``proj_lora1``) and
text (``qkv_lora2``, ``proj_lora2``) stream's fused q/k/v and output projection, per single
block q/k/v of ``linear1`` (``qkv_lora``, without the MLP rows) and ``linear2``
(``proj_lora``, x-flux's ``LoRALinearLayer(15360, dim)``). No alpha, no text encoder.
"""

from __future__ import annotations

from registry.lora.formats.names import BFL_DOUBLE, BFL_SINGLE, BlockNames
from registry.lora.formats.spec import Format, Writer, any_key

NAMES: BlockNames = {
    "double_blocks": {"processor.qkv_lora1": BFL_DOUBLE["img_attn.qkv"],
                      "processor.proj_lora1": BFL_DOUBLE["img_attn.proj"],
                      "processor.qkv_lora2": BFL_DOUBLE["txt_attn.qkv"],
                      "processor.proj_lora2": BFL_DOUBLE["txt_attn.proj"]},
    "single_blocks": {"processor.qkv_lora": BFL_SINGLE["linear1"][:3],
                      "processor.proj_lora": BFL_SINGLE["linear2"]},
}

FORMAT = Format(
    name="xlabs",
    detect=lambda keys: any_key(keys, lambda k: ".processor." in k),
    roles=((".down.weight", "down"), (".up.weight", "up")),
    prefixes=("diffusion_model.",),
    block_names=NAMES,
    writer=Writer(key=lambda module: module, down=".down.weight", up=".up.weight", fused=NAMES),
)
