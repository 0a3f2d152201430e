"""Gate checkpoints land with the permissions of any other file the project writes (``open(path, "w")``:
0o666 less the umask, as the encoder checkpoints via ``registry.atomic_write``), whole, and read back."""

from __future__ import annotations

import os
import stat

import torch

from pipelines.fusion_methods.gated import GateSet
from pipelines.train_gates import load_gates, save_gates


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_gate_checkpoints_get_the_mode_a_plain_open_gives(tmp_path):
    plain = tmp_path / "plain"
    with open(plain, "w"):
        pass
    gates = GateSet(state={"a.weight": torch.arange(6.0).reshape(2, 3)}, time_features=2, rank_global=3,
                    use_global=False, version="v1", meta={"pool": ["x"]})
    path = save_gates(tmp_path / "gates" / "v1.safetensors", gates)
    assert _mode(path) == _mode(plain)
    assert sorted(p.name for p in path.parent.iterdir()) == ["v1.safetensors"]  # no temp file left
    loaded = load_gates(path)
    assert torch.equal(loaded.state["a.weight"], gates.state["a.weight"])
    assert (loaded.time_features, loaded.rank_global, loaded.use_global, loaded.version, loaded.meta) == (
        2, 3, False, "v1", {"pool": ["x"]})

    save_gates(path, GateSet(state={"b": torch.ones(1)}, version="v2"))  # over an existing one
    assert _mode(path) == _mode(plain) and load_gates(path).version == "v2"
