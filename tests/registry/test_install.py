"""The installed packages win over a user's plain folders of the same names: a script run from a
ComfyUI-like folder holding ``models/`` and ``registry/`` (data, no ``__init__.py``) still imports
the client, as the README's Python examples do."""

from __future__ import annotations

import subprocess
import sys


def test_plain_folders_named_like_the_packages_do_not_shadow_them(tmp_path):
    for folder in ("models/loras", "registry", "pipelines"):
        (tmp_path / folder).mkdir(parents=True)
    script = tmp_path / "use_registry.py"
    script.write_text("from registry import Registry\nimport models.encoder, pipelines.generate\n"
                      "import registry\nprint(registry.__file__)\n")
    got = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    assert not got.stdout.strip().startswith(str(tmp_path))
