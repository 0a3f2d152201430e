"""Dagster resources: the registry, configured by path."""


import os

import dagster as dg

from registry import Registry


class RegistryResource(dg.ConfigurableResource):
    """The LanceDB LoRA registry at ``path``."""

    path: str = os.environ.get("AUTOLORA_REGISTRY", ".autolora/registry")

    def open(self) -> Registry:
        return Registry.open(self.path)
