"""``autolora caption --model`` when its real vLLM server (.venv-vllm, a random tiny Qwen2-VL) dies
mid-pass: the pass stops at once, what was captioned stays written, the end of the server's log is
shown, exit 1, and a rerun finishes; SIGTERM to the command stops the server it launched (no orphan)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from caption_fixtures import WITH_RENDERS, captioning_registry
from terminal_signals import as_from_a_terminal

from pipelines import cli
from pipelines.caption_registry import _Pass
from pipelines.vllm_server import default_served_name, vllm_available, vllm_python
from pipelines.world.captioner import build_random_captioner
from registry import Registry


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    if not vllm_available():
        pytest.skip(f"no vLLM environment at {vllm_python()} (bin/setup-vllm creates it)")
    return build_random_captioner(tmp_path_factory.mktemp("model") / "tiny-qwen2-vl", seed=0)


def _servers(model: Path) -> list[int]:
    """PIDs of vLLM servers whose command line names ``model``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
        except OSError:
            continue
        if str(model).encode() in cmdline and b"api_server" in cmdline:
            found.append(int(proc.name))
    return found


def _kill_all(model: Path) -> None:
    for pid in _servers(model):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def _captioned(root: Path, name: str) -> set[str]:
    reg = Registry.open(root, create=False)
    rows = [reg.get(r["lora_id"]) for r in reg.column_rows(reg.loras, ["lora_id"])]
    return {r["name"] for r in rows if r["caption_model"] == name}


def test_a_server_that_dies_mid_pass_stops_it_says_why_and_a_rerun_finishes(
        model, micro_world, tmp_path, capsys, monkeypatch):
    root = captioning_registry(micro_world, tmp_path).root
    one_batch = _Pass.caption

    def first_lora_then_the_server_dies(self, rows):  # as an OOM kill between two LoRAs
        # up to the first LoRA with renders (the pass goes by id, and one without renders is only skipped)
        k = next((i for i, row in enumerate(rows) if row.get("render_blobs")), 0) + 1
        one_batch(self, rows[:k])
        for pid in _servers(model):
            os.killpg(pid, signal.SIGKILL)
        one_batch(self, rows[k:])

    monkeypatch.setattr(_Pass, "caption", first_lora_then_the_server_dies)
    args = ["caption", "--registry", str(root), "--model", str(model), "--cache-dir", str(tmp_path / "cache")]
    try:
        t0 = time.perf_counter()
        rc = cli.main(args)
        took = time.perf_counter() - t0
    finally:
        _kill_all(model)
    out, err = capsys.readouterr()
    name = default_served_name(model)
    assert rc == 1 and out.startswith(f"1 LoRAs captioned by {name}") and "1 left (stopped)" in out, (out, err)
    assert "stopped: " in err and "refuses connections" in err and "1 LoRAs left for a rerun" in err
    assert "the vLLM server was killed by SIGKILL while in use; the end of its log:" in err
    assert "Traceback" not in err and len(err.splitlines()) < 60 and took < 120  # one stop, not a line per LoRA
    assert len(_captioned(root, name)) == 1  # written before the server died
    monkeypatch.setattr(_Pass, "caption", one_batch)
    try:
        assert cli.main(args) == 0  # the rerun finishes the rest
    finally:
        _kill_all(model)
    out, err = capsys.readouterr()
    assert "1 LoRAs captioned" in out and "1 up to date" in out and "0 failed" in out, (out, err)
    assert _captioned(root, name) == set(WITH_RENDERS)


def test_sigterm_stops_the_server_it_launched(model, micro_world, tmp_path):
    _kill_all(model)  # (a server an earlier test left behind would be taken for this command's)
    deadline = time.monotonic() + 30
    while _servers(model) and time.monotonic() < deadline:
        time.sleep(0.2)
    root = captioning_registry(micro_world, tmp_path).root
    command = [str(Path(sys.executable).with_name("autolora")), "caption", "--registry", str(root),
               "--model", str(model), "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=as_from_a_terminal)
    try:
        deadline = time.monotonic() + 120
        while not _servers(model) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _servers(model), "no vLLM server was started"
        time.sleep(2)  # the server loading its model
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        left = _servers(model)
    finally:
        proc.kill()
        _kill_all(model)
    assert proc.returncode == 130 and err.strip() == "autolora caption: interrupted; run it again to go on", err
    assert left == []  # stopped, not orphaned
