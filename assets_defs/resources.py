"""Dagster resources: the registry, configured by path."""


import os

import dagster as dg
from pydantic import Field

from registry import Registry


class RegistryResource(dg.ConfigurableResource):
    """The LanceDB LoRA registry at ``path``."""

    path: str = Field(os.environ.get("AUTOLORA_REGISTRY", ".autolora/registry"),
                      description="the registry folder (default: $AUTOLORA_REGISTRY or .autolora/registry)")

    def open(self, create: bool = False) -> Registry:
        """The registry at ``path``. ``create`` (ingest and sync) makes one where there is none;
        otherwise a missing registry fails the run with one message, so a mistyped path creates nothing."""
        from registry import RegistryNotFound

        try:
            return Registry.open(self.path, create=create)
        except RegistryNotFound as error:
            raise dg.Failure(f"{error} (the registry resource's path: set AUTOLORA_REGISTRY, or ingest first)",
                             allow_retries=False) from None

    def open_existing(self) -> Registry:
        """The registry if one exists at ``path`` (else :class:`RegistryNotFound`); never creates one."""
        return Registry.open(self.path, create=False)
