"""Gates trained on a registry's LoRAs and their sample renders (the real-base path), from the CLI."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from pipelines.cli import main
from pipelines.registry_gates import registry_pool, render_pairs
from pipelines.train_gates import load_gates
from registry import Registry
from registry.lora.base_models import BaseModel
from registry.store.store import quote


def test_registry_gates_from_the_cli_then_cached(micro_world, tmp_path, capsys):
    bare = tmp_path / "bare"  # a LoRA file without its card and renders
    bare.mkdir()
    shutil.copy(sorted((micro_world / "heldout_loras").glob("*.safetensors"))[0], bare / "bare.safetensors")
    reg = Registry.open(tmp_path / "registry")
    base = BaseModel.from_json((micro_world / "base_model.json").read_text())
    reg.register_base(base)
    reg.add([micro_world / "loras", bare])
    bare_id = next(r["lora_id"] for r in reg.column_rows(reg.loras, ["lora_id", "source_path"])
                   if r["source_path"].startswith(os.path.realpath(bare)))

    argv = ["train", "gates", "--registry", str(tmp_path / "registry"), "--base", str(micro_world), "--steps", "3",
            "--json"]
    assert main(argv) == 0
    out = capsys.readouterr()
    first = json.loads(out.out)
    assert not first["cached"] and bare_id in first["skipped"]  # (so is the world's re-upload, also bare)
    assert all(why.startswith("no sample render") for why in first["skipped"].values())
    assert f"skipped {bare_id}: no sample render" in out.err
    pool, _ = registry_pool(reg, base.name, 32)
    assert sorted(first["pool"]) == sorted(p.lora_id for p in pool) and len(pool) == len(reg) - len(first["skipped"])
    gates = load_gates(first["path"])
    assert os.path.dirname(first["path"]) == str(reg.root / "gates") and gates.version == first["version"]
    trained = {k: v for k, v in gates.state.items() if k.endswith(".w_o")}
    assert trained and any(not np.allclose(v.numpy(), 2.0) for v in trained.values())  # the gates moved

    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["cached"] and again["path"] == first["path"]

    # the pool's renders are its images and their prompts, trigger words included
    row = reg.rows(reg.loras, f"lora_id = {quote(pool[0].lora_id)}", 1)[0]
    pairs = render_pairs(reg, row)
    assert [text for _, text in pairs] == pool[0].captions and pool[0].images.shape == (len(pairs), 32, 32, 3)
    assert all(row["trigger_words"][0] in text for text in pool[0].captions)

    # usage errors are one line, no traceback
    assert main(["train", "gates", "--registry", str(tmp_path / "registry")]) == 2
    assert "needs --base" in capsys.readouterr().err
    assert main([*argv[:6], "--where", f"lora_id = {quote(bare_id)}"]) == 2
    assert "at least two LoRAs" in capsys.readouterr().err
    assert main(["train", "gates", "--world", str(micro_world), "--base", str(micro_world)]) == 2
    assert "give --registry" in capsys.readouterr().err

    # generate on that base and registry picks those gates up by itself
    image = tmp_path / "out.png"
    assert main(["generate", "a red circle", "--registry", str(tmp_path / "registry"), "--base", str(micro_world),
                 "-k", "2", "-o", str(image), "--json"]) == 0
    done = capsys.readouterr()
    assert json.loads(done.out)["gates"] == first["version"] and "warning" not in done.err and image.is_file()
