"""A micro demo world shared by the pipeline tests that need one (built once per session).

``AUTOLORA_TEST_MICRO_WORLD`` may name an already built micro world folder (``.../micro-seed0``)
to skip the build."""

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
