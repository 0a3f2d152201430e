"""Captioning end to end against the real vLLM OpenAI server (CPU build, .venv-vllm) serving a random
tiny Qwen2-VL, and the client's retry/time-out behaviour against a stub on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from caption_fixtures import JsonHandler

from pipelines.caption import Captioner, CaptionError, png_bytes
from pipelines.vllm_server import VLLMServerError, vllm_available, vllm_python, vllm_server
from pipelines.world.captioner import build_random_captioner
from pipelines.world.themes import broad_mix


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    images, _, _ = broad_mix(6, seed=42)
    return [_png(im) for im in images]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not vllm_available():
        pytest.skip(f"no vLLM environment at {vllm_python()} (bin/setup-vllm creates it)")
    folder = build_random_captioner(tmp_path_factory.mktemp("model") / "tiny-qwen2-vl", seed=0)
    with vllm_server(folder, startup_timeout=600) as srv:
        yield srv


def _served_requests(srv) -> float:
    """Requests the vLLM server has finished, from its Prometheus metrics (its own count, not ours)."""
    text = requests.get(srv.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r'^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$', text, re.M))


def test_vllm_captions_concurrently_and_caches(server, pngs, tmp_path):
    assert server.model.startswith("tiny-qwen2-vl-")  # the folder's name and a hash of its content
    before = _served_requests(server)
    with Captioner(server.base_url, server.model, cache_dir=tmp_path, concurrency=3, max_tokens=12) as cap:
        first = cap.caption(pngs + [pngs[0]])  # a duplicate is captioned once
        assert cap.requests_made == len(pngs)
        assert _served_requests(server) - before == len(pngs)
        assert [c.image_sha256 for c in first[:-1]] == [hashlib.sha256(p).hexdigest() for p in pngs]
        assert not any(c.cached for c in first) and first[-1] == first[0]
        assert all(c.model == server.model and isinstance(c.text, str) for c in first)
        # sequential requests give the same greedy captions as the concurrent batch
        assert [cap.caption_one(p) for p in pngs[:3]] == [c.text for c in first[:3]]
        made = cap.requests_made
        served = _served_requests(server)
        second = cap.caption(pngs)
        assert cap.requests_made == made and _served_requests(server) == served  # nothing sent
        assert all(c.cached for c in second) and [c.text for c in second] == [c.text for c in first[:-1]]
    # the cache outlives the captioner; another prompt is another key
    with Captioner(server.base_url, server.model, cache_dir=tmp_path, max_tokens=12) as again:
        assert [c.text for c in again.caption(pngs[:2])] == [c.text for c in first[:2]]
        assert again.requests_made == 0
    with Captioner(server.base_url, server.model, prompt="What shape?", cache_dir=tmp_path, max_tokens=12) as other:
        assert not other.caption(pngs[:1])[0].cached and other.requests_made == 1


def test_attach_to_running_server(server, pngs):
    with vllm_server(url=server.base_url.removesuffix("/v1")) as attached:
        assert attached.base_url == server.base_url and attached.model == server.model and attached.pid is None
        with Captioner(attached.base_url, attached.model, max_tokens=4) as cap:
            assert len(cap.caption(pngs[:1])) == 1
    assert requests.get(server.base_url + "/models", timeout=10).ok  # attaching did not stop it


def test_server_startup_failure_reports_log(tmp_path):
    if not vllm_available():
        pytest.skip(f"no vLLM environment at {vllm_python()} (bin/setup-vllm creates it)")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(VLLMServerError, match="exited with code"):
        with vllm_server(tmp_path, startup_timeout=300):
            pass


# ----------------------------------------------------------------------------- stub endpoint


class _Stub(ThreadingHTTPServer):
    """OpenAI chat-completions shaped answers; ``plan`` says what each successive request gets."""

    daemon_threads = True

    def __init__(self, plan: list[str], delay: float = 0.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.plan, self.delay = list(plan), delay
        self.hits, self.inflight, self.max_inflight = 0, 0, 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(JsonHandler):
    def do_POST(self):
        srv: _Stub = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.hits += 1
            action = srv.plan.pop(0) if srv.plan else "ok"
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
        try:
            if action == "slow":
                time.sleep(3.0)
            time.sleep(srv.delay)
            if action == "500":
                status, answer = 500, {"error": {"message": "boom", "type": "server_error"}}
            else:
                url = body["messages"][0]["content"][0]["image_url"]["url"]
                text = f"caption of {len(url)} chars"
                status, answer = 200, {
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }  # fmt: skip
        finally:
            # counted out before the answer is written: once it is, the client may send its next request,
            # which another handler thread can count in before this one would get here (4 of 3 under load)
            with srv.lock:
                srv.inflight -= 1
        self._send(status, answer)


@pytest.fixture
def stub(request):
    plan, delay = request.param
    srv = _Stub(plan, delay)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("stub", [(["500"], 0.0)], indirect=True)
def test_retries_a_server_error(stub, pngs):
    with Captioner(stub.url, "m", backoff=0.01) as cap:
        (c,) = cap.caption(pngs[:1])
    assert stub.hits == 2 and c.text.startswith("caption of") and not c.cached


@pytest.mark.parametrize("stub", [(["slow"], 0.0)], indirect=True)
def test_retries_after_a_time_out(stub, pngs):
    with Captioner(stub.url, "m", timeout=0.5, backoff=0.01) as cap:
        t0 = time.perf_counter()
        (c,) = cap.caption(pngs[:1])
    assert stub.hits == 2 and c.text.startswith("caption of")
    assert 0.5 <= time.perf_counter() - t0 < 2.5  # the slow answer (3 s) was not waited for


@pytest.mark.parametrize("stub", [(["500"] * 10, 0.0)], indirect=True)
def test_gives_up_after_retries_and_keeps_nothing(stub, pngs, tmp_path):
    with Captioner(stub.url, "m", cache_dir=tmp_path, retries=2, backoff=0.01) as cap:
        with pytest.raises(CaptionError, match="1 of 1 images"):
            cap.caption(pngs[:1])
        assert len(cap.cache) == 0
    assert stub.hits == 3  # one try and two retries


@pytest.mark.parametrize("stub", [([], 0.5)], indirect=True)
def test_concurrency_is_bounded(stub, pngs):
    with Captioner(stub.url, "m", concurrency=3) as cap:
        caps = cap.caption(pngs)
    assert stub.hits == len(pngs) and len(caps) == len(pngs)
    assert stub.max_inflight == 3  # three at a time, never more


def test_non_png_input_is_converted(tmp_path, pngs):
    jpg = tmp_path / "x.jpg"
    Image.open(io.BytesIO(pngs[0])).save(jpg, format="JPEG")
    assert png_bytes(jpg).startswith(b"\x89PNG") and png_bytes(pngs[0]) == pngs[0]
    assert png_bytes(Path(jpg)) == png_bytes(str(jpg))
