"""``autolora caption`` through the real vLLM OpenAI server (.venv-vllm, a random tiny Qwen2-VL),
started once by the command itself (``--model``): sample renders captioned, a LoRA without renders
rendered by the micro world's base (``--base``) and captioned, a rerun with nothing pending starts
no server; bad command lines exit 2 with one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from caption_fixtures import WITH_RENDERS, WITHOUT, captioning_registry

from pipelines import cli
from pipelines.caption_registry import CaptionReport
from pipelines.cli_captions import show
from pipelines.vllm_server import default_served_name, free_port, vllm_available, vllm_python
from pipelines.world.captioner import build_random_captioner
from registry import Registry
from registry.captions import SELF_RENDERED

BASE = "autolora-demo-flux"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    if not vllm_available():
        pytest.skip(f"no vLLM environment at {vllm_python()} (bin/setup-vllm creates it)")
    return build_random_captioner(tmp_path_factory.mktemp("model") / "tiny-qwen2-vl", seed=0)


@pytest.fixture(scope="module")
def registry_root(micro_world, tmp_path_factory) -> Path:
    return captioning_registry(micro_world, tmp_path_factory.mktemp("clicap")).root


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """``autolora caption ARGS`` in this process: (exit status, stdout, stderr)."""
    try:
        rc = cli.main(["caption", *args])
    except SystemExit as exit_:  # argparse errors
        rc = exit_.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _rows(root: Path) -> dict[str, dict]:
    reg = Registry.open(root, create=False)
    return {r["name"]: reg.get(r["lora_id"]) for r in reg.column_rows(reg.loras, ["lora_id", "name"])}


def _processes_serving(model: Path) -> list[int]:
    """PIDs whose command line names ``model`` (a vLLM server left running would)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(model).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_usage_errors_exit_2_with_one_line(registry_root, micro_world, tmp_path, capsys):
    missing = tmp_path / "no-registry"
    cases = {
        "holds no autolora registry": ["--registry", str(missing), "--url", "http://127.0.0.1:1"],
        "one of the arguments --url --model is required": ["--registry", str(registry_root)],
        "not allowed with argument": ["--registry", str(registry_root), "--url", "http://x", "--model", "m"],
        "expected BASE_MODEL=PIPELINE": ["--registry", str(registry_root), "--url", "http://x", "--base", "nobase"],
        "expected BASE_MODEL=PIPELINE, ": ["--registry", str(registry_root), "--url", "http://x", "--base", f"{BASE}="],
        "knows no base model 'nobase'": ["--registry", str(registry_root), "--url", "http://x",
                                         "--base", f"nobase={micro_world}"],
        "neither a diffusers pipeline folder": ["--registry", str(registry_root), "--url", "http://x",
                                                "--base", f"{BASE}={tmp_path}"],
        "give --base too": ["--registry", str(registry_root), "--url", "http://x", "--renders", "2"],
        "must be at least 1": ["--registry", str(registry_root), "--url", "http://x", "--renders", "0",
                               "--base", f"{BASE}={micro_world}"],
        "neither an existing model folder nor a Hub repo id": ["--registry", str(registry_root),
                                                               "--model", str(tmp_path / "no-model")],
        "'captionr' is neither an existing model folder": ["--registry", str(registry_root), "--model", "captionr"],
        "--dtype, --vllm-arg set how --model is served": ["--registry", str(registry_root), "--url", "http://x",
                                                          "--dtype", "auto", "--vllm-arg=--seed=1"],
        "--max-model-len set how --model is served": ["--registry", str(registry_root), "--url", "http://x",
                                                      "--max-model-len", "0"],
    }
    for expected, args in cases.items():
        rc, out, err = _cli(capsys, *args)
        assert rc == 2 and out == "" and expected in err, (args, err)
        assert err.startswith("autolora caption: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not missing.exists()  # nothing created
    # the console script's own exit status, as a shell sees it
    run = subprocess.run([str(Path(sys.executable).with_name("autolora")), "caption", "--registry",
                          str(registry_root)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--url --model" in run.stderr


def test_an_endpoint_that_does_not_answer_fails_with_one_line(registry_root, capsys):
    rc, out, err = _cli(capsys, "--registry", str(registry_root), "--url", f"http://127.0.0.1:{free_port()}")
    assert rc == 1 and out == "" and err.count("\n") == 1 and "no OpenAI server answers" in err


def test_skipped_and_failed_loras_go_to_stderr_with_their_reasons(capsys):
    report = CaptionReport(model="m", captioned=1, images=3, requests=2, cached=1, up_to_date=4,
                           self_rendered={"c": 3},
                           skipped=[{"lora_id": "a", "reason": "no sample render image; no pipeline for its base"}],
                           failed=[{"lora_id": "b", "name": "b-name", "reason": "captioning failed: boom"}])
    show(report, as_json=False)
    out, err = capsys.readouterr()
    assert out == ("1 LoRAs captioned by m (3 renders, 1 from the cache), 1 self-rendered, 4 up to date, "
                   "1 skipped, 1 failed\n")
    assert err.splitlines() == [
        "skipped a: no sample render image; no pipeline for its base",
        "failed b (b-name): captioning failed: boom"]
    show(report, as_json=True)
    shown = json.loads(capsys.readouterr().out)
    assert shown == {**report.to_dict(), "server_started": False, "server_start_seconds": 0.0}


def test_caption_with_model_self_renders_then_a_rerun_starts_no_server(
        model, registry_root, micro_world, tmp_path, capsys, monkeypatch):
    before = _rows(registry_root)
    assert sum(len(before[t]["render_blobs"]) for t in WITH_RENDERS) == 3 and before[WITHOUT]["render_blobs"] == []
    t0 = time.perf_counter()
    rc, out, err = _cli(capsys, "--registry", str(registry_root), "--model", str(model),
                        "--base", f"{BASE}={micro_world}", "--renders", "2", "--cache-dir", str(tmp_path / "cache"))
    with capsys.disabled():
        print(f"\nautolora caption --model (server start, 5 captions, 2 renders): {time.perf_counter() - t0:.1f} s")
    served = default_served_name(model)  # tiny-qwen2-vl-HASH
    assert rc == 0 and err == "", err
    assert out == (f"3 LoRAs captioned by {served} (5 renders, 0 from the cache), 1 self-rendered, "
                   "0 up to date, 0 skipped, 0 failed\n")
    assert _processes_serving(model) == []  # the server it launched is stopped
    after = _rows(registry_root)
    for name, row in after.items():
        assert row["caption_model"] == served and len(row["captions"]) == len(row["render_blobs"]) > 0
        assert all((registry_root / b).is_file() for b in row["render_blobs"])
    for name in WITH_RENDERS:  # published renders kept as they were
        assert after[name]["render_blobs"] == before[name]["render_blobs"]
    made = after[WITHOUT]
    assert len(made["render_blobs"]) == 2 and all(p.startswith(SELF_RENDERED) for p in made["render_prompts"])
    version = Registry.open(registry_root, create=False).version

    # a rerun: every LoRA has captions of that model, so no server is started at all
    def no_server(*args, **kwargs):
        raise AssertionError("a vLLM server was started with nothing to caption")

    monkeypatch.setattr("pipelines.captioner_endpoint.vllm_server", no_server)
    rerun = ["--registry", str(registry_root), "--model", str(model), "--base", f"{BASE}={micro_world}"]
    rc, out, err = _cli(capsys, *rerun, "--json")
    assert rc == 0 and err == "", err
    report = json.loads(out)
    assert report["captioned"] == 0 and report["requests"] == 0 and report["up_to_date"] == 3
    assert report["model"] == served and report["server_started"] is False
    rc, out, err = _cli(capsys, *rerun)
    assert rc == 0 and err == "" and out == (f"nothing to caption: 3 LoRAs have captions of {served}, 0 cannot "
                                             "get any (no render, no --base for their base model); no server started\n")
    assert Registry.open(registry_root, create=False).version == version

    # a new LoRA without renders, and no --base to render it: nothing a server could do, none started
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(sorted((micro_world / "heldout_loras").glob("*.safetensors"))[-1], bare / "bare.safetensors")
    assert len(Registry.open(registry_root, create=False).add([bare]).added) == 1
    rc, out, err = _cli(capsys, "--registry", str(registry_root), "--model", str(model))
    assert rc == 0 and f"3 LoRAs have captions of {served}, 1 cannot get any" in out, (out, err)
    assert "no server started" in out and err.startswith("skipped ") and "no sample render image" in err
    rc, out, err = _cli(capsys, "--registry", str(registry_root), "--model", str(model), "--json")
    report = json.loads(out)  # the same counts as a pass would give: the render-less LoRA is skipped, not up to date
    assert report["up_to_date"] == 3 and len(report["skipped"]) == 1 and report["server_started"] is False
