"""A registry of the micro demo world's LoRAs (the world: ``tests/conftest.py``), shared
by the generation/evaluation tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def micro_registry(micro_world, tmp_path_factory):
    from registry import Registry
    from registry.lora.base_models import BaseModel

    reg = Registry.open(tmp_path_factory.mktemp("registry") / "registry")
    reg.register_base(BaseModel.from_json((micro_world / "base_model.json").read_text()))
    reg.add([micro_world / "loras", micro_world / "heldout_loras"])
    return reg
