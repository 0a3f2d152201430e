"""A small registry for the captioning tests: two micro-world LoRAs with their cards and sample
renders, and one held-out LoRA copied bare (no card, no render: self-rendering's case); and a
broken OpenAI-compatible endpoint on 127.0.0.1 (rejecting or hanging), for the failure tests."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from registry import Registry
from registry.lora.base_models import BaseModel

WITH_RENDERS = ("triangle", "square")  # 1 and 2 sample renders
WITHOUT = "red-diamond"  # copied without its card and preview


def captioning_registry(micro_world: Path, root: Path) -> Registry:
    """The registry at ``root/registry``, its LoRAs first copied to ``root/loras``."""
    folder = root / "loras"
    folder.mkdir()
    for theme in WITH_RENDERS:
        for file in (micro_world / "loras").glob(f"{theme}.*"):
            shutil.copy(file, folder / file.name)
    shutil.copy(micro_world / "heldout_loras" / f"{WITHOUT}.safetensors", folder)
    reg = Registry.open(root / "registry")
    reg.register_base(BaseModel.from_json((micro_world / "base_model.json").read_text()))
    assert len(reg.add([folder]).added) == 3
    return reg


VLLM_400 = {"object": "error", "message": "The decoder prompt (length 300) is longer than the maximum model length "
            "of 256.", "type": "BadRequestError", "param": None, "code": 400}


class _Broken(ThreadingHTTPServer):
    """Answers ``answer(n)`` to the n-th POST: "ok", "400", "hang" (GET /models hangs too then)."""

    daemon_threads = True

    def __init__(self, answer):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answer, self.posts, self.lock = answer, 0, threading.Lock()
        self.hanging = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet request handler that answers JSON (the stub endpoints' base)."""

    def log_message(self, *args):
        pass

    def _send(self, code: int, payload: dict):
        data = json.dumps(payload).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client timed out and left


class _Handler(JsonHandler):
    def do_GET(self):
        if self.server.hanging:
            time.sleep(30)
        self._send(200, {"object": "list", "data": [{"id": "m"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.posts += 1
            action = self.server.answer(self.server.posts)
        if action == "hang":
            self.server.hanging = True
            time.sleep(30)
        elif action == "400":
            self._send(400, VLLM_400)
        else:
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": f"stub {self.server.posts}"}}]})


@contextmanager
def broken_endpoint() -> Iterator[Callable[[Callable[[int], str]], _Broken]]:
    """A function that starts a :class:`_Broken` server; all of them shut down after the block."""
    servers = []

    def start(answer: Callable[[int], str]) -> _Broken:
        srv = _Broken(answer)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    try:
        yield start
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()
