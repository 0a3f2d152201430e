"""Dagster resources: the registry, configured by path."""


import os

import dagster as dg
from pydantic import Field

from registry import Registry


class RegistryResource(dg.ConfigurableResource):
    """The LanceDB LoRA registry at ``path``."""

    path: str = Field(os.environ.get("AUTOLORA_REGISTRY", ".autolora/registry"),
                      description="the registry folder (default: $AUTOLORA_REGISTRY or .autolora/registry)")

    def open(self) -> Registry:
        return Registry.open(self.path)
