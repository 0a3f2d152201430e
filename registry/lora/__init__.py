"""The LoRA-file half of the registry: one file alone, no LanceDB.

``safe_read`` (never unpickles), ``formats/`` (one module per file format behind a small
registry: detect, key spellings, writers), ``conversion`` and ``canonical`` (any format ->
ΔW = B A per layer: our name map, cross-checked by diffusers' converters), ``fingerprint``,
``base_models``, ``metadata`` (header and sidecars), ``inspect`` (all of it for one file),
``errors``.
"""
