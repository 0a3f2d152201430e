"""The safetensors files we write depend on their content only (not on the process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from models import safetensors_bytes
from models.safetensors_bytes import save_file, to_bytes

METADATA = {"ss_network_dim": "16", "ss_network_alpha": "8", "modelspec.architecture": "flux-1-dev/lora",
            "ss_output_name": "jade pyramid", "note": "ünïcode \"quoted\" \\ and\nnewline", "z": "{}"}
ROOT = Path(__file__).resolve().parents[2]

_WRITE = """
import hashlib, sys, torch
sys.path.insert(0, {root!r})
from models.safetensors_bytes import save_file, to_bytes
tensors = {{"b.lora_up.weight": torch.arange(12.0).reshape(4, 3), "a.lora_down.weight": torch.ones(3, 4)}}
metadata = {metadata!r}
save_file(tensors, sys.argv[1], metadata=metadata)
print(hashlib.sha256(to_bytes(tensors, metadata)).hexdigest())
"""


def _tensors() -> dict[str, torch.Tensor]:
    return {"b.lora_up.weight": torch.arange(12.0).reshape(4, 3), "a.lora_down.weight": torch.ones(3, 4)}


def test_the_same_content_gives_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    # safetensors alone orders __metadata__ at random per process: six keys, three processes
    script = _WRITE.format(root=str(ROOT), metadata=METADATA)
    paths, digests = [tmp_path / f"{i}.safetensors" for i in range(3)], set()
    for path in paths:
        done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
        digests.add(done.stdout.strip())
    assert len(digests) == 1
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    assert paths[0].read_bytes() == to_bytes(_tensors(), METADATA)


def test_files_read_back_whole_with_the_metadata_sorted(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file(_tensors(), path, metadata=METADATA)
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    assert length % 8 == 0
    header = json.loads(data[8:8 + length])
    assert list(header["__metadata__"]) == sorted(METADATA)
    with safe_open(path, "pt") as handle:
        assert handle.metadata() == METADATA
        assert {k: handle.get_tensor(k) for k in handle.keys()}.keys() == _tensors().keys()
        assert torch.equal(handle.get_tensor("b.lora_up.weight"), _tensors()["b.lora_up.weight"])


def test_a_header_of_another_length_rewrites_the_whole_file(tmp_path: Path, monkeypatch) -> None:
    sort = safetensors_bytes._sorted_header
    monkeypatch.setattr(safetensors_bytes, "_sorted_header", lambda raw: sort(raw) + b" " * 8)
    path = tmp_path / "x.safetensors"
    save_file(_tensors(), path, metadata=METADATA)
    with safe_open(path, "pt") as handle:
        assert handle.metadata() == METADATA
        assert torch.equal(handle.get_tensor("a.lora_down.weight"), torch.ones(3, 4))
    assert path.read_bytes() == to_bytes(_tensors(), METADATA)


def test_no_metadata_or_one_key_is_the_library_s_own_file(tmp_path: Path) -> None:
    from safetensors.torch import save

    assert to_bytes(_tensors()) == save(_tensors())
    assert to_bytes(_tensors(), {"k": "v"}) == save(_tensors(), metadata={"k": "v"})
