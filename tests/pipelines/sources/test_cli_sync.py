"""``autolora sync``: the sources of a sources file into a registry, the cursor kept between runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "registry"))
from flux_fixtures import flux_lora, partial_names  # noqa: E402

from registry.lora.formats import save_lora  # noqa: E402

AUTOLORA = str(Path(sys.executable).with_name("autolora"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([AUTOLORA, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sync_ingests_new_files_once_and_keeps_its_cursor(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    save_lora(folder / "one.safetensors", flux_lora(partial_names((1,), ()), rank=2, seed=1), "kohya")
    (tmp_path / "sources.toml").write_text('[[source]]\nkind = "local"\nname = "mine"\nfolder = "loras"\n')
    common = ["--registry", str(tmp_path / "registry"), "--sources", str(tmp_path / "sources.toml"),
              "--download-dir", str(tmp_path / "downloads"), "--json"]
    first = run("sync", *common)
    assert first.returncode == 0, first.stderr
    assert [Path(a["path"]).name for a in json.loads(first.stdout)["mine"]["ingest"]["added"]] == ["one.safetensors"]
    assert (tmp_path / "downloads" / "mine.cursor.json").is_file()
    assert not [p.name for p in (tmp_path / "downloads").iterdir() if p.name.endswith((".tmp", ".partial"))]
    again = json.loads(run("sync", *common).stdout)["mine"]
    assert again["discovered"] == 0 and again["ingest"] is None  # the cursor says nothing is new
    save_lora(folder / "two.safetensors", flux_lora(partial_names((2,), ()), rank=2, seed=2), "kohya")
    third = json.loads(run("sync", "mine", *common).stdout)["mine"]
    assert [Path(a["path"]).name for a in third["ingest"]["added"]] == ["two.safetensors"]


def test_sync_usage_errors_are_one_line(tmp_path):
    (tmp_path / "bad.toml").write_text("[[source]\n")
    (tmp_path / "ok.toml").write_text('[[source]]\nkind = "local"\nname = "mine"\nfolder = "x"\n')
    registry = str(tmp_path / "registry")
    for args in (("--sources", str(tmp_path / "bad.toml")), ("--sources", str(tmp_path / "none.toml")),
                 ("nope", "--sources", str(tmp_path / "ok.toml"))):
        out = run("sync", *args, "--registry", registry)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert out.stderr.startswith("autolora sync: ")
    assert not Path(registry).exists()
