"""autolora's LoRA registry: ``from registry import Registry``.

Two halves with ingest above both: ``registry.lora`` (one LoRA file: safe read, formats,
canonical form, fingerprint, base models, metadata) and ``registry.store`` (LanceDB tables,
blobs, versions, search, maintenance). ``registry.ingest`` moves files into the store;
``registry.client`` is the :class:`Registry` users hold. Exports are loaded on first use, so
``import registry`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Registry": "registry.client",
    "SearchHit": "registry.store.search",
    "NoWeightEncoder": "registry.store.search",
    "EmbedReport": "registry.embed",
    "RegistryNotFound": "registry.store.store",
    "VersionNotFound": "registry.store.store",
    "RegistryNotWritable": "registry.store.store",
    "RegistryWriteFailed": "registry.ingest.storage_failure",
    "MaintenanceReport": "registry.store.maintenance",
    "IngestReport": "registry.ingest",
    "RejectedFile": "registry.lora.errors",
    "BaseModel": "registry.lora.base_models",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'registry' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
