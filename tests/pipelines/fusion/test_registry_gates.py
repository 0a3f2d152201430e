"""Gates trained on a registry's LoRAs and their sample renders (the real-base path), from the CLI."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from pipelines.cli import main
from pipelines.registry_gates import base_weights_id, registry_pool, render_pairs
from pipelines.train_gates import load_gates
from registry import Registry
from registry.lora.base_models import BaseModel
from registry.store.store import quote


def test_registry_gates_from_the_cli_then_cached(micro_world, tmp_path, capsys, monkeypatch):
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
    # gates trained on a base run in another precision are other gates; each precision finds its own again
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert not half["cached"] and half["path"] != first["path"]
    assert load_gates(half["path"]).meta["trained_on"] == "cpu bfloat16"
    assert main([*argv, "--dtype", "bfloat16"]) == 0 and json.loads(capsys.readouterr().out)["path"] == half["path"]
    assert main([*argv, "--dtype", "float32"]) == 0 and json.loads(capsys.readouterr().out)["path"] == first["path"]
    monkeypatch.chdir(micro_world.parent)  # the same base spelt another way is the same base
    assert main([*argv[:5], f"./{micro_world.name}/base/../base", *argv[6:]]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == first["path"]

    # the pool's renders are its images and their prompts, trigger words included
    row = reg.rows(reg.loras, f"lora_id = {quote(pool[0].lora_id)}", 1)[0]
    pairs = render_pairs(reg, row)
    assert [text for _, text in pairs] == pool[0].captions and pool[0].images.shape == (len(pairs), 32, 32, 3)
    assert all(row["trigger_words"][0] in text for text in pool[0].captions)

    # usage errors are one line, no traceback, before any model is loaded
    assert main(["train", "gates", "--registry", str(tmp_path / "registry")]) == 2
    assert "needs --base" in capsys.readouterr().err
    assert main([*argv[:6], "--where", f"lora_id = {quote(bare_id)}"]) == 2
    err = capsys.readouterr().err  # the skipped LoRAs are listed, and how to give them renders
    assert "at least two LoRAs" in err and f"skipped {bare_id}: no sample render" in err and "autolora caption" in err
    for extra, says in ((["--where", "lora_id = 'nothing'"], "matched no LoRAs"), (["--where", "lora_id ="], "not valid"),
                        (["--base-model", "sdxl-typo"], "unknown base model 'sdxl-typo'; the registry knows: "),
                        (["--size", "15"], "not a positive multiple of 8"), (["--size", "100000"], "at most 128")):
        assert main([*argv[:6], *extra]) == 2, extra
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert main([*argv[:5], "nobody/not-cached-flux", *argv[6:]]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
    assert main(["train", "gates", "--world", str(micro_world), "--base", str(micro_world)]) == 2
    assert "give --registry" in capsys.readouterr().err

    # generate on that base and registry picks the newest gates up by itself, and says which
    assert main([*argv, "--steps", "2"]) == 0  # a trial: now the newest
    trial = json.loads(capsys.readouterr().out)
    image = tmp_path / "out.png"
    generate = ["generate", "a red circle", "--registry", str(tmp_path / "registry"), "--base", str(micro_world),
                "-k", "2", "-o", str(image), "--json"]
    assert main(generate) == 0 and json.loads(capsys.readouterr().out)["gates"] == trial["version"]
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["cached"]  # asked for again: the newest again
    (reg.root / "gates" / "gates-not-ours.safetensors").write_bytes(b"\xff" * 64)  # a stray file is no candidate
    assert main(generate) == 0
    done = capsys.readouterr()
    assert json.loads(done.out)["gates"] == first["version"] and "warning" not in done.err and image.is_file()
    assert f"using gates {first['path']}" in done.err  # and what they were trained for, on which machine
    pool, trained_for = len(load_gates(first["path"]).meta["pool"]), (micro_world / "base").resolve()
    assert f"trained for {trained_for} on {pool} LoRAs of " in done.err and "on cpu float32" in done.err
    assert "matched by its transformer's weights" not in done.err

    # the same pipeline under another spelling (a local copy of a Hub base, say) finds them by its weight files
    copy = tmp_path / "same-base-elsewhere"
    shutil.copytree(micro_world / "base", copy)
    assert load_gates(first["path"]).meta["base_weights"] == base_weights_id(str(copy)) is not None
    assert main([*generate[:5], str(copy), *generate[6:]]) == 0
    done = capsys.readouterr()
    assert json.loads(done.out)["gates"] == first["version"] and f"using gates {first['path']}" in done.err
    assert f"trained for {trained_for}, matched by its transformer's weights" in done.err
    # a stray or variant file beside the weights diffusers loads changes nothing
    (copy / "transformer" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not these weights")
    assert base_weights_id(str(copy)) == base_weights_id(str(micro_world / "base"))
    # other weights (a fine-tune) under another name find none, and say which bases the folder has gates for
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # the last float32 weight becomes 1.0
    weights.write_bytes(bytes(data))
    assert base_weights_id(str(copy)) != base_weights_id(str(micro_world / "base"))
    assert main([*generate[:5], str(copy), *generate[6:]]) == 0
    err = capsys.readouterr().err
    assert "holds gates for other bases only" in err and str((micro_world / "base").resolve()) in err
    assert base_weights_id("nobody/not-cached-flux") is None


def test_base_weights_are_hashed_once_and_older_gates_learn_theirs(micro_world, tmp_path, capsys, monkeypatch):
    import pipelines.registry_gates as registry_gates
    from pipelines.train_gates import save_gates

    reg = Registry.open(tmp_path / "registry")
    reg.register_base(BaseModel.from_json((micro_world / "base_model.json").read_text()))
    reg.add([micro_world / "loras"])
    argv = ["train", "gates", "--registry", str(reg.root), "--base", str(micro_world), "--steps", "1", "--json"]
    assert main(argv) == 0
    path = json.loads(capsys.readouterr().out)["path"]
    gates = load_gates(path)
    assert gates.meta["trained_on"] == "cpu float32" and gates.meta["base_weights"]
    cache = reg.root / "gates" / "base-weights.json"
    assert len(json.loads(cache.read_text())) == 1  # the one weight file, by path, size, mtime and inode

    hashed = []
    monkeypatch.setattr(registry_gates, "sha256_file", lambda p: hashed.append(p) or "x")
    assert base_weights_id(str(micro_world / "base"), cache) == gates.meta["base_weights"] and not hashed

    # gates trained before their base's weights were kept: a cached rerun of train gates adds them
    del gates.meta["base_weights"]
    save_gates(path, gates)
    copy = tmp_path / "copy"
    shutil.copytree(micro_world / "base", copy)
    monkeypatch.undo()
    generate = ["generate", "a red circle", "--registry", str(reg.root), "--base", str(copy), "-k", "1",
                "--steps", "1", "-o", str(tmp_path / "x.png"), "--json"]
    assert main(generate) == 0 and json.loads(capsys.readouterr().out)["gates"] is None
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["cached"]
    assert load_gates(path).meta["base_weights"] == base_weights_id(str(copy))
    assert main(generate) == 0 and json.loads(capsys.readouterr().out)["gates"] == gates.version


def test_a_base_missing_a_component_is_a_one_line_usage_error(micro_world, micro_registry, tmp_path, capsys):
    for component in ("vae", "transformer"):
        broken = tmp_path / f"no-{component}"
        shutil.copytree(micro_world / "base", broken)
        shutil.rmtree(broken / component)
        code = main(["train", "gates", "--registry", str(micro_registry.root), "--base", str(broken), "--steps", "1"])
        err = capsys.readouterr().err
        assert code == 2 and f"its {component}/config.json is missing" in err and err.count("\n") == 1, err
