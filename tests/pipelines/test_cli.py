"""The ``autolora`` console script's JSON contract (inspect / ingest / search)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))
from flux_fixtures import flux_lora, partial_names  # noqa: E402

from registry.lora.formats import save_lora  # noqa: E402

AUTOLORA = str(Path(sys.executable).with_name("autolora"))


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([AUTOLORA, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "loras"
    root.mkdir()
    layers = flux_lora(partial_names((2,), (4,)), rank=16, seed=7)
    save_lora(root / "neon_city.safetensors", layers, "kohya",
              metadata={"ss_output_name": "neon city", "modelspec.trigger_phrase": "n30n"})
    save_lora(root / "neon_city_diffusers.safetensors", layers, "diffusers")
    (root / "notes.txt").write_text("not a LoRA, and not a candidate when walking folders")
    (root / "old.ckpt").write_bytes(b"\x80\x04K\x01.")
    return root


def test_inspect_json(folder):
    out = run("inspect", str(folder / "neon_city.safetensors"), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert set(info) == {"sha256", "format", "architecture", "base_model", "rank", "layers", "fingerprint"}
    assert info["format"] == "kohya" and info["architecture"] == "flux" and info["base_model"] == "FLUX.1-dev"
    assert info["rank"] == 16 and info["layers"] == len(partial_names((2,), (4,)))
    other = json.loads(run("inspect", str(folder / "neon_city_diffusers.safetensors"), "--json").stdout)
    assert other["fingerprint"] == info["fingerprint"] and other["sha256"] != info["sha256"]


def test_inspect_rejected_exits_1(folder):
    out = run("inspect", str(folder / "old.ckpt"), "--json")
    assert out.returncode == 1
    result = json.loads(out.stdout)
    assert result["rejected"] is True and "not loaded" in result["reason"]


def test_ingest_and_search_json(folder, tmp_path):
    registry = tmp_path / "registry"
    out = run("ingest", str(folder), "--registry", str(registry), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [Path(a["path"]).name for a in report["added"]] == ["neon_city.safetensors"]
    assert report["duplicates"] == [{"path": str(folder / "neon_city_diffusers.safetensors"),
                                     "lora_id": report["added"][0]["lora_id"], "kind": "fingerprint"}]
    assert [Path(r["path"]).name for r in report["rejected"]] == ["old.ckpt"]
    hits = json.loads(run("search", "neon city lights", "--registry", str(registry), "-k", "3", "--json").stdout)
    assert hits[0]["lora_id"] == report["added"][0]["lora_id"]
    assert set(hits[0]) == {"lora_id", "name", "score", "base_model", "trigger_words"}
    assert hits[0]["name"] == "neon city" and hits[0]["trigger_words"] == ["n30n"]
    human = run("search", "neon", "--registry", str(registry))
    assert human.returncode == 0 and "neon city" in human.stdout
