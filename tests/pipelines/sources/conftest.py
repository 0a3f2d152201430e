"""Fixtures for the source tests (the helpers behind them: ``source_fixtures.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_fixtures import lora_bytes  # noqa: E402


@pytest.fixture
def loras(tmp_path) -> list[bytes]:
    """Three distinct LoRA files."""
    return [lora_bytes(tmp_path, seed) for seed in (1, 2, 3)]
