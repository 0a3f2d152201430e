"""The import contracts (pyproject.toml, checked by ``lint-imports`` in bin/test) are kept, and
they do catch a cycle: one is added to a temporary copy of the packages, never to the tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = str(Path(sys.executable).with_name("lint-imports"))
PACKAGES = ("models", "registry", "pipelines", "assets_defs")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)},
                          timeout=300)


@pytest.fixture
def copy(tmp_path) -> Path:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize("module, line, contract", [
    ("registry/lora/fingerprint.py", "from registry.lora import canonical", "registry.lora layers"),
    ("registry/store/store.py", "import registry.ingest", "registry: client"),
    ("registry/store/schema.py", "from registry.lora import errors", "registry: client"),
    ("models/text_encoder.py", "import registry.client", "imports flow"),
])
def test_an_added_cycle_breaks_a_contract(copy, module, line, contract):
    assert _lint(copy).returncode == 0  # the copy keeps every contract, as the tree does
    with open(copy / module, "a", encoding="utf-8") as handle:
        handle.write(f"\n{line}  # a cycle, added by the test\n")
    result = _lint(copy)
    assert result.returncode != 0
    broken = [l for l in result.stdout.splitlines() if "BROKEN" in l]
    assert any(contract in l for l in broken), result.stdout[-3000:]
