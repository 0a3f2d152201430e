"""A micro demo world and a registry of its LoRAs, shared by the slow generation/evaluation tests.

``AUTOLORA_TEST_MICRO_WORLD`` may name an already built micro world folder (``.../micro-seed0``)
to skip the ~90 s build."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory) -> Path:
    given = os.environ.get("AUTOLORA_TEST_MICRO_WORLD")
    if given:
        return Path(given)
    from pipelines.world.build import build_world

    out = tmp_path_factory.mktemp("world")
    build_world(out, size="micro", seed=0, progress=False)
    return out / "micro-seed0"


@pytest.fixture(scope="session")
def micro_registry(micro_world, tmp_path_factory):
    from registry import Registry
    from registry.lora.base_models import BaseModel

    reg = Registry.open(tmp_path_factory.mktemp("registry") / "registry")
    reg.register_base(BaseModel.from_json((micro_world / "base_model.json").read_text()))
    reg.add([micro_world / "loras", micro_world / "heldout_loras"])
    return reg
