"""The LoRA-file half of the registry: one file alone, no LanceDB.

``safe_read`` (never unpickles), ``formats`` (key spellings and writers), ``conversion`` and
``canonical`` (any format -> ΔW = B A per layer), ``fingerprint``, ``base_models``, ``metadata``
(header and sidecars), ``inspect`` (all of it for one file), ``errors``.
"""
