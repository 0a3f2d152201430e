"""Test-wide settings: offline, few threads, a fresh registry per test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def registry_dir(tmp_path):
    return tmp_path / "registry"
