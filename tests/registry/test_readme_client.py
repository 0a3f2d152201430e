"""The README's Python example, run as written, in a temporary folder under a fake ``~``."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

from flux_fixtures import flux_lora, partial_names

from registry.lora.formats import save_lora

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    section = README.read_text(encoding="utf-8").split("## Python client", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_under_a_fake_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    loras = home / "ComfyUI" / "models" / "loras"
    loras.mkdir(parents=True)
    save_lora(loras / "fox.safetensors", flux_lora(partial_names((1,), (2,)), rank=4, seed=11), "kohya")
    (loras / "fox.json").write_text(json.dumps({"name": "Watercolor Fox", "trigger_words": ["wtrfx"],
                                                "description": "a watercolor fox in the snow"}))
    save_lora(loras / "city.safetensors", flux_lora(partial_names((3,), ()), rank=2, seed=12), "diffusers")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_example(), "README.md", "exec"), {})
    printed = out.getvalue()
    assert (home / "autolora-registry" / "registry.json").is_file()
    assert printed.splitlines()[0] == "2 0 0"  # added, duplicates, rejected
    assert "Watercolor Fox" in printed.splitlines()[1]


def test_the_example_copes_with_an_empty_result(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ComfyUI" / "models" / "loras").mkdir(parents=True)
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(readme_example(), "README.md", "exec"), {})  # no NameError on no hits
