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

    def open_existing(self) -> Registry:
        """The registry if one exists at ``path`` (else :class:`RegistryNotFound`); never creates one."""
        return Registry.open(self.path, create=False)
