"""Materialising one registry asset in a test, on a registry of micro-world LoRAs."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from assets_defs.resources import RegistryResource
from registry import BaseModel, Registry


def micro_registry(micro_world: Path, path: Path, *folders: Path) -> Registry:
    """A registry at ``path`` that knows the micro world's base and holds the LoRAs of ``folders``."""
    reg = Registry.open(path)
    reg.register_base(BaseModel.from_json((micro_world / "base_model.json").read_text()))
    reg.add(list(folders))
    return reg


def materialize(asset: dg.AssetsDefinition, registry: Path, **config) -> dict:
    """Run ``asset`` with ``config`` against the registry at ``registry``; its metadata values."""
    name = asset.key.to_user_string()
    result = dg.materialize([asset], run_config={"ops": {name: {"config": config}}},
                            resources={"registry": RegistryResource(path=str(registry))},
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    return {k: v.value for k, v in result.asset_materializations_for_node(name)[0].metadata.items()}
