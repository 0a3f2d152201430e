"""The ``autolora`` console script's JSON contract (inspect / ingest / search)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from terminal_signals import as_from_a_terminal

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))
from flux_fixtures import flux_lora, partial_names, tiny_flux_base  # noqa: E402

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
    assert set(info) == {"sha256", "format", "architecture", "base_model", "rank", "layers", "fingerprint", "notes"}
    assert info["format"] == "kohya" and info["architecture"] == "flux" and info["base_model"] == "FLUX.1-dev"
    assert info["notes"] == []  # nothing ignored, and diffusers' converter agrees with ours
    assert info["rank"] == 16 and info["layers"] == len(partial_names((2,), (4,)))
    other = json.loads(run("inspect", str(folder / "neon_city_diffusers.safetensors"), "--json").stdout)
    assert other["fingerprint"] == info["fingerprint"] and other["sha256"] != info["sha256"]


def test_inspect_says_what_conversion_noted(tmp_path):
    """What conversion worked around reaches the user: here diffusers' converter cannot check a
    fal/Kontext file that covers one block only (it needs them all), so ours alone converted it."""
    from flux_fixtures import control_lora_layers, fal_kontext_state
    from safetensors.torch import save_file

    few = {n: f for n, f in control_lora_layers(rank=2).items() if n.startswith("transformer_blocks.3.")}
    save_file(fal_kontext_state(few), tmp_path / "kontext.safetensors")
    out = run("inspect", str(tmp_path / "kontext.safetensors"), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["format"] == "fal_kontext" and any("diffusers: KeyError" in n for n in info["notes"]), info
    table = run("inspect", str(tmp_path / "kontext.safetensors"))
    assert table.returncode == 0 and "diffusers: KeyError" in table.stdout.replace("\n", ""), table.stdout


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


def test_usage_errors_exit_2_and_create_nothing(folder, tmp_path):
    typo = tmp_path / "TYPO"
    for args in (("search", "neon", "--registry", str(typo)),
                 ("search", "neon", "--registry", str(typo), "--version", "prod"),
                 ("maintain", "--registry", str(typo)), ("prune", "--registry", str(typo)),
                 ("ingest", str(tmp_path / "nothere"), "--registry", str(typo)),
                 ("inspect", str(tmp_path / "nothere.safetensors"))):
        out = run(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr and out.stderr.startswith("autolora "), out.stderr
    assert not typo.exists()
    for k in ("0", "-1"):
        for channel in ("weights", "hybrid"):
            out = run("search", "neon", "--registry", str(typo), "-k", k, "--channel", channel)
            assert out.returncode == 2 and "must be at least 1" in out.stderr
            assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # one line, not argparse's usage block


def test_links_empty_folders_and_quiet_output(folder, tmp_path):
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    (tmp_path / "empty").mkdir()
    registry = str(tmp_path / "registry")
    out = run("ingest", str(loop), str(tmp_path / "empty"), "--registry", registry, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [(r["path"], r["code"]) for r in report["rejected"]] == [(str(loop), "broken_link")]
    assert any("no LoRA files found" in w for w in report["warnings"])
    inspected = run("inspect", str(loop), "--json")  # the same link, the same code
    assert inspected.returncode == 1 and json.loads(inspected.stdout)["code"] == "broken_link"
    human = run("ingest", str(folder), "--registry", registry)
    assert human.returncode == 0 and human.stderr == ""  # no library chatter by default
    search = run("search", "neon", "--registry", registry)
    assert search.returncode == 0 and search.stderr == "" and "neon city" in search.stdout
    empty = run("search", "nothing matches", "--registry", registry, "--where", "rank > 1000")
    assert empty.returncode == 0 and "no LoRA matches" in empty.stdout


def test_inspect_unreadable_file_is_a_rejection_not_a_traceback(folder, monkeypatch, capsys):
    """(Permissions do not bind root, who runs CI: the read is made to fail as it would.)"""
    from pipelines import cli
    from registry.lora import inspect

    def refuse(path, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(inspect, "read_safetensors", refuse)
    assert cli.main(["inspect", str(folder / "neon_city.safetensors"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {"rejected": True, "code": "unreadable",
                                                   "reason": "unreadable: Permission denied"}


def test_prune_hides_vanished_loras(folder, tmp_path):
    import shutil

    mine = tmp_path / "mine"
    shutil.copytree(folder, mine)
    registry = str(tmp_path / "registry")
    added = json.loads(run("ingest", str(mine), "--registry", registry, "--json").stdout)["added"]
    shutil.rmtree(mine)
    counts = json.loads(run("prune", "--registry", registry, "--json").stdout)
    assert counts["removed"] == len(added) == 1
    hits = json.loads(run("search", "neon city", "--registry", registry, "--json").stdout)
    assert hits == []
    hidden = run("search", "neon city", "--registry", registry, "--include-removed", "--json")
    assert [h["lora_id"] for h in json.loads(hidden.stdout)] == [added[0]["lora_id"]]


def test_building_the_command_line_imports_no_heavy_library():
    """Every command (a cold ``search`` above all) pays for what it uses, not for torch and diffusers
    that only some subcommands need: parsing imports none of them."""
    code = ("import sys; from pipelines.cli import build_parser; build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers', 'lancedb'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)


def test_inspect_matches_the_default_registrys_bases(tmp_path):
    """``inspect`` without --registry knows the bases of $AUTOLORA_REGISTRY (the README's default)."""
    from registry import Registry

    base = tiny_flux_base()
    lora = tmp_path / "tiny.safetensors"
    save_lora(lora, flux_lora(list(base.layer_shapes)[:4], rank=2, base=base), "diffusers")
    Registry.open(tmp_path / "registry").register_base(base)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    unknown = subprocess.run([AUTOLORA, "inspect", str(lora), "--json"], capture_output=True, text=True,
                             env={**env, "AUTOLORA_REGISTRY": str(tmp_path / "none")}, timeout=600)
    assert unknown.returncode == 1 and json.loads(unknown.stdout)["code"] == "unknown_base"
    known = subprocess.run([AUTOLORA, "inspect", str(lora), "--json"], capture_output=True, text=True,
                           env={**env, "AUTOLORA_REGISTRY": str(tmp_path / "registry")}, timeout=600)
    assert known.returncode == 0, known.stdout + known.stderr
    assert json.loads(known.stdout)["base_model"] == "tiny-flux"
    assert not (tmp_path / "none").exists()


def test_a_reader_that_leaves_early_gets_no_traceback(folder, tmp_path):
    """``autolora search ... | head``: the pipe closes before the table is written."""
    registry = str(tmp_path / "registry")
    assert run("ingest", str(folder), "--registry", registry).returncode == 0
    proc = subprocess.Popen([AUTOLORA, "search", "neon", "--registry", registry], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_inspect_reads_the_base_a_sidecar_names_as_ingest_does(folder, tmp_path):
    """Shapes that fit FLUX.1-dev and -schnell alike: a .civitai.info saying "Flux.1 S" decides."""
    import shutil

    lora = tmp_path / "neon_city.safetensors"
    shutil.copy(folder / "neon_city.safetensors", lora)
    assert json.loads(run("inspect", str(lora), "--json").stdout)["base_model"] == "FLUX.1-dev"
    (tmp_path / "neon_city.civitai.info").write_text(json.dumps({"baseModel": "Flux.1 S"}))
    out = run("inspect", str(lora), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["base_model"] == "FLUX.1-schnell", out.stdout


def test_a_prompt_that_is_not_utf8_is_a_usage_error(tmp_path, capsys):
    import os

    from pipelines.cli import main

    prompt = os.fsdecode(b"caf\xe9")  # as the command line delivers undecodable bytes
    assert main(["search", prompt, "--registry", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == ("autolora search: the prompt is not valid UTF-8 (check the terminal's "
                                       "encoding)\n")


LORAS_TO_INTERRUPT = 160  # ample time for the poll below to see the first blobs and interrupt (~5 s of ingest)


def test_ctrl_c_ends_a_command_with_one_line_and_a_rerun_finishes(tmp_path):
    import time

    from registry import Registry

    loras = tmp_path / "many"
    loras.mkdir()
    for i in range(LORAS_TO_INTERRUPT):
        save_lora(loras / f"l{i:03d}.safetensors", flux_lora(partial_names((i % 19,), ()), rank=4, seed=300 + i),
                  "diffusers")
    registry = tmp_path / "registry"
    proc = subprocess.Popen([AUTOLORA, "ingest", str(loras), "--registry", str(registry), "--batch-size", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=as_from_a_terminal)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # interrupt once some LoRAs are stored
        if sum(1 for _ in (registry / "blobs").rglob("*.safetensors")) >= 4:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "autolora ingest: interrupted; run it again to go on"
    assert "Traceback" not in err
    again = run("ingest", str(loras), "--registry", str(registry), "--json")
    assert again.returncode == 0 and len(Registry.open(registry)) == LORAS_TO_INTERRUPT


def test_show_prints_one_loras_row_renders_and_paths(folder, tmp_path):
    registry = tmp_path / "registry"
    added = json.loads(run("ingest", str(folder), "--registry", str(registry), "--json").stdout)["added"]
    lora_id = next(a["lora_id"] for a in added if a["path"].endswith("neon_city.safetensors"))
    shown = json.loads(run("show", lora_id[:12], "--registry", str(registry), "--json").stdout)
    assert shown["lora_id"] == lora_id and shown["name"] == "neon city" and shown["trigger_words"] == ["n30n"]
    assert {Path(p["path"]).name for p in shown["paths"]} == {"neon_city.safetensors", "neon_city_diffusers.safetensors"}
    assert "weight_vector" not in shown and "text_vector" not in shown
    table = run("show", lora_id, "--registry", str(registry))
    assert table.returncode == 0 and "n30n" in table.stdout and "paths" in table.stdout  # (80 columns: paths wrap)
    missing = run("show", "lora-nope", "--registry", str(registry))
    assert missing.returncode == 2 and missing.stderr.startswith("autolora show: no LoRA 'lora-nope' in ")
    other = tmp_path / "other.safetensors"
    save_lora(other, flux_lora(partial_names((5,), ()), rank=4, seed=8), "diffusers")
    assert run("ingest", str(other), "--registry", str(registry)).returncode == 0
    ambiguous = run("show", "lora-", "--registry", str(registry))
    assert ambiguous.returncode == 2 and "starts 2 LoRA ids" in ambiguous.stderr and "give more of it" in ambiguous.stderr
