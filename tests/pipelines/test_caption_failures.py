"""Captioning against broken endpoints (a plain HTTP server on 127.0.0.1 stands in for them): a
rejected request keeps the server's message, a render that does not decode is never sent, a refused
or hung endpoint is given up at once instead of per image, and a registry pass stops when its
endpoint dies, keeping what it wrote, with counts that add up; a read-only registry is refused first."""

from __future__ import annotations

import io
import struct
import tempfile
import time
import zlib

import numpy as np
import pytest
from caption_fixtures import WITH_RENDERS, WITHOUT, broken_endpoint, captioning_registry
from PIL import Image

from pipelines import cli
from pipelines.caption import Caption, Captioner, CaptionError, EndpointDown
from pipelines.caption_registry import _Pass, caption_registry
from pipelines.vllm_server import free_port
from registry import Registry, RegistryNotWritable

@pytest.fixture
def broken():
    with broken_endpoint() as start:
        yield start


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _garbage_pixels(png: bytes) -> bytes:
    """The PNG with its image data replaced by noise (CRCs fixed): Pillow's verify() passes, load() fails."""
    at = png.index(b"IDAT") - 4
    length = struct.unpack(">I", png[at:at + 4])[0]
    noise = np.random.default_rng(0).integers(0, 255, length, dtype=np.uint8).tobytes()
    chunk = struct.pack(">I", length) + b"IDAT" + noise + struct.pack(">I", zlib.crc32(b"IDAT" + noise))
    return png[:at] + chunk + png[at + 12 + length:]


def test_a_rejected_request_keeps_the_servers_message(broken):
    srv = broken(lambda n: "400")
    with Captioner(srv.url, "m", backoff=0.01) as cap:
        (result,) = cap.results([_png(0)])
        assert "400" in str(result) and "longer than the maximum model length of 256" in str(result)
        with pytest.raises(CaptionError, match="longer than the maximum model length"):
            cap.caption([_png(1)])


def test_a_render_that_does_not_decode_is_its_own_failure_and_never_sent(broken, tmp_path):
    corrupt = tmp_path / "render-1234.png"
    corrupt.write_bytes(_garbage_pixels(_png(0)))
    Image.open(corrupt).verify()  # what an ingest-time check sees: nothing wrong
    srv = broken(lambda n: "ok")
    with Captioner(srv.url, "m") as cap:
        good, bad = cap.results([_png(1), corrupt])
    assert isinstance(good, Caption) and srv.posts == 1  # the corrupt one was not sent
    assert isinstance(bad, ValueError) and "render-1234.png cannot be decoded" in str(bad)


def test_refused_connections_give_the_endpoint_up_at_once():
    with Captioner(f"http://127.0.0.1:{free_port()}/v1", "m", concurrency=2, backoff=0.01) as cap:
        t0 = time.perf_counter()
        results = cap.results([_png(i) for i in range(12)])
        took = time.perf_counter() - t0
    assert all(isinstance(r, EndpointDown) and "refuses connections" in str(r) for r in results)
    assert "Connection refused" in str(results[0]) and "MaxRetryError" not in str(results[0])
    assert cap.requests_made <= 2 and took < 5  # not every image waiting out its own retries


def test_a_hung_endpoint_is_given_up_after_the_stall_time(broken):
    srv = broken(lambda n: "hang")
    with Captioner(srv.url, "m", timeout=120, stall=1.0) as cap:
        t0 = time.perf_counter()
        results = cap.results([_png(i) for i in range(3)])
        took = time.perf_counter() - t0
    assert all(isinstance(r, EndpointDown) for r in results) and "stopped answering" in str(results[0])
    assert took < 10  # not 120 s per attempt


def _rows(reg: Registry) -> dict[str, dict]:
    return {r["name"]: reg.get(r["lora_id"]) for r in reg.column_rows(reg.loras, ["lora_id", "name"])}


def test_counts_add_up_and_failures_name_the_lora(broken, micro_world, tmp_path):
    reg = captioning_registry(micro_world, tmp_path)
    srv = broken(lambda n: "400")
    with Captioner(srv.url, "m", cache_dir=tmp_path / "cache", backoff=0.01) as cap:
        report = caption_registry(reg, cap)
    assert (report.images, report.requests, report.cached, report.captioned) == (0, 0, 0, 0)
    assert srv.posts == 3  # each render asked once: no LoRA-by-LoRA second round
    assert sorted(f["name"] for f in report.failed) == sorted(WITH_RENDERS)
    assert all("longer than the maximum model length" in f["reason"] for f in report.failed)
    assert [s["name"] for s in report.skipped] == [WITHOUT]


def test_a_dead_endpoint_stops_the_pass_and_keeps_what_was_written(broken, micro_world, tmp_path, monkeypatch):
    reg = captioning_registry(micro_world, tmp_path)
    srv = broken(lambda n: "ok")
    first = sorted(WITH_RENDERS, key=lambda name: _rows(reg)[name]["lora_id"])[0]  # the pass goes by id
    one_batch = _Pass.caption

    def then_the_server_dies(self, rows):
        one_batch(self, rows)
        if srv.posts and not dead:  # after the first batch that asked it anything (one without renders asks nothing)
            dead.append(True)
            srv.shutdown()
            srv.server_close()  # from now on: connection refused

    dead: list[bool] = []

    monkeypatch.setattr(_Pass, "caption", then_the_server_dies)
    with Captioner(srv.url, "m", cache_dir=tmp_path / "cache", concurrency=1, backoff=0.01) as cap:
        t0 = time.perf_counter()
        report = caption_registry(reg, cap, batch_size=1)
        took = time.perf_counter() - t0
    assert report.captioned == 1 and report.writes == 1 and "refuses connections" in report.stopped
    assert report.left == 1 and not report.failed and took < 10  # the remaining LoRA left for a rerun, not failed
    assert report.images == report.requests + report.cached
    rows = _rows(Registry.open(reg.root, create=False))
    assert rows[first]["caption_model"] == "m" and rows[first]["captions"]  # written before the endpoint died


def test_a_registry_that_cannot_be_written_is_refused_before_any_work(micro_world, tmp_path, monkeypatch, capsys):
    reg = captioning_registry(micro_world, tmp_path)

    def refused(*args, **kwargs):  # as a read-only mount answers (root ignores permission bits)
        raise OSError(30, "Read-only file system")

    def no_server(*args, **kwargs):
        raise AssertionError("a server was started for a registry that cannot be written")

    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    monkeypatch.setattr("pipelines.captioner_endpoint.vllm_server", no_server)
    with Captioner(f"http://127.0.0.1:{free_port()}/v1", "m") as cap, pytest.raises(RegistryNotWritable):
        caption_registry(reg, cap)
    rc = cli.main(["caption", "--registry", str(reg.root), "--model", str(micro_world)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("autolora caption: cannot write to the registry at ") and err.count("\n") == 1
    assert "Read-only file system" in err
