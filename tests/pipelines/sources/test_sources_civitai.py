"""Civitai source against a real HTTP server on 127.0.0.1 (pytest-httpserver).

The JSON served is shaped from the public API docs (developer.civitai.com, "REST API
Reference": ``/api/v1/models`` with ``metadata.nextCursor``, model versions with ``trainedWords``,
``files[].hashes.SHA256``, ``downloadUrl``, ``images[].meta.prompt`` / ``nsfwLevel``; downloads
answer 307 with the signed URL and ``Content-Disposition``). Each fault test checks that nothing
half-written reached the registry or the download folder.
"""

from __future__ import annotations

import time

import pytest
from source_fixtures import png_bytes, sha256
from werkzeug import Request, Response

from pipelines.sources.civitai import CivitaiSource
from pipelines.sources.sync import STAGING, sync
from registry import Registry

TOKEN = "test-key"


class FakeCivitai:
    """Docs-shaped Civitai: two pages of models, a download redirect, a CDN with ``Range``."""

    def __init__(self, server, loras: list[bytes]) -> None:
        self.server, self.loras = server, loras
        self.blobs = {f"lora{i}.safetensors": data for i, data in enumerate(loras)}
        self.blobs["img0.png"] = png_bytes(10)
        self.promised = {name: sha256(data) for name, data in self.blobs.items()}
        self.api_calls: list[Request] = []
        self.cdn_calls: list[Request] = []
        self.cdn_fault = None  # callable(request, name) -> Response | None
        self.api_fault = None
        server.expect_request("/api/v1/models").respond_with_handler(self.models)
        server.expect_request("/api/v1/model-versions/by-hash", ).respond_with_handler(self.by_hash)
        for i in range(len(loras)):
            server.expect_request(f"/api/download/models/{100 + i}").respond_with_handler(self.redirect)
        server.expect_request("/cdn/lora0.safetensors").respond_with_handler(self.cdn)
        for name in self.blobs:
            server.expect_request(f"/cdn/{name}").respond_with_handler(self.cdn)

    def version(self, i: int) -> dict:
        name = f"lora{i}.safetensors"
        return {
            "id": 100 + i, "modelId": 10 + i, "name": "v1.0", "baseModel": "Flux.1 D",
            "trainedWords": [f"trig{i}"], "nsfwLevel": 1, "description": f"style {i}",
            "files": [{"id": 900 + i, "name": name, "type": "Model", "sizeKB": len(self.loras[i]) / 1024,
                       "metadata": {"format": "SafeTensor", "fp": "fp32"}, "primary": True,
                       "hashes": {"SHA256": self.promised[name].upper(), "AutoV2": self.promised[name][:10].upper()},
                       "downloadUrl": self.server.url_for(f"/api/download/models/{100 + i}")}],
            "images": [{"url": self.server.url_for("/cdn/img0.png"), "nsfwLevel": 1, "width": 4, "height": 4,
                        "meta": {"prompt": f"a watercolour fox, trig{i}", "seed": 1}}],
        }

    def model(self, i: int) -> dict:
        return {"id": 10 + i, "name": f"Watercolour {i}", "type": "LORA", "nsfw": False,
                "tags": ["style", "watercolor"], "allowCommercialUse": ["Image"],
                "creator": {"username": "someone"}, "modelVersions": [self.version(i)]}

    def models(self, request: Request) -> Response:
        self.api_calls.append(request)
        if self.api_fault and (fault := self.api_fault(request)):
            return fault
        assert request.args.getlist("types") == ["LORA"] and request.args.getlist("baseModels") == ["Flux.1 D"]
        ids = sorted(range(len(self.loras)), reverse=True)  # Newest first
        pages = [ids[:2], ids[2:]]
        page = 1 if request.args.get("cursor") == "p2" else 0
        meta = {"nextCursor": "p2", "nextPage": self.server.url_for("/api/v1/models") + "?cursor=p2"} if page == 0 else {}
        return Response(_json({"items": [self.model(i) for i in pages[page]], "metadata": meta}),
                        content_type="application/json")

    def by_hash(self, request: Request) -> Response:
        return Response("{}", status=404)

    def redirect(self, request: Request) -> Response:
        i = int(request.path.rsplit("/", 1)[-1]) - 100
        name = f"lora{i}.safetensors"
        return Response(status=307, headers={"Location": self.server.url_for(f"/cdn/{name}") + "?sig=abc",
                                             "Content-Disposition": f'attachment; filename="{name}"'})

    def cdn(self, request: Request) -> Response:
        self.cdn_calls.append(request)
        name = request.path.rsplit("/", 1)[-1]
        if self.cdn_fault and (fault := self.cdn_fault(request, name)):
            return fault
        data = self.blobs[name]
        start = int(request.headers["Range"].removeprefix("bytes=").split("-")[0]) if "Range" in request.headers else 0
        if start:
            return Response(data[start:], status=206, content_type="application/octet-stream",
                            headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        return Response(data, content_type="application/octet-stream")


def _json(data) -> str:
    import json

    return json.dumps(data)


@pytest.fixture
def civitai(httpserver, loras):
    return FakeCivitai(httpserver, loras)


def _source(civitai: FakeCivitai, **kw) -> CivitaiSource:
    return CivitaiSource(civitai.server.url_for("/").rstrip("/"), token=TOKEN, page_size=2, **kw)


def _entries(download_dir) -> list[str]:
    root = download_dir / "civitai"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_crawl_downloads_verified_files_with_cards_and_ingests_them(civitai, tmp_path):
    reg = Registry.open(tmp_path / "reg")
    source = _source(civitai)
    started = time.perf_counter()
    for _ in range(20):  # discovery alone: pages/s of the crawl
        source.discover(None)
    pages_per_s = source.pages_read / (time.perf_counter() - started)
    print(f"\ncivitai discovery: {source.pages_read} pages at {pages_per_s:.0f} pages/s")
    started = time.perf_counter()
    report = sync(source, reg, tmp_path / "dl")
    elapsed = time.perf_counter() - started
    assert report.failed == [] and report.discovered == 3 and len(report.downloaded) == 3
    assert len(report.ingest.added) == 3 and report.ingest.rejected == []
    rows = {r["name"]: r for r in reg.column_rows(reg.loras, ["name", "trigger_words", "render_prompts",
                                                               "render_blobs"])}
    assert sorted(rows) == ["Watercolour 0", "Watercolour 1", "Watercolour 2"]
    assert rows["Watercolour 1"]["trigger_words"] == ["trig1"]
    assert rows["Watercolour 1"]["render_prompts"] == ["a watercolour fox, trig1"]
    assert all(r["render_blobs"][0] for r in rows.values())  # the render was downloaded and stored
    assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in civitai.api_calls)
    assert not list((tmp_path / "dl" / STAGING / "civitai").iterdir())
    print(f"civitai sync (2 pages, 3 versions: download + verify + ingest): {elapsed:.2f} s")

    again = sync(source, reg, tmp_path / "dl", report.cursor)
    assert again.discovered == 0 and again.downloaded == [] and again.ingest.added == []


def test_429_and_5xx_are_retried_then_succeed(civitai, tmp_path):
    answers = iter([Response("slow down", status=429, headers={"Retry-After": "1"}), Response("oops", status=503)])
    civitai.api_fault = lambda request: next(answers, None)
    cdn_answers = iter([Response("bad gateway", status=502)])
    civitai.cdn_fault = lambda request, name: next(cdn_answers, None) if name == "lora0.safetensors" else None
    started = time.perf_counter()
    report = sync(_source(civitai), Registry.open(tmp_path / "reg"), tmp_path / "dl")
    assert report.failed == [] and len(report.ingest.added) == 3
    assert len(civitai.api_calls) == 4  # 429, 503, page 1, page 2
    assert time.perf_counter() - started >= 1.0  # Retry-After was honoured


def test_download_cut_mid_file_is_resumed_with_range(civitai, loras, tmp_path):
    cut = {"done": False}

    def fault(request, name):
        if name != "lora2.safetensors" or cut["done"]:
            return None
        cut["done"] = True
        data = civitai.blobs[name]

        def half_then_drop():
            yield data[: len(data) // 2]
            raise ConnectionAbortedError("connection cut mid-file")
        return Response(half_then_drop(), content_type="application/octet-stream",
                        headers={"Content-Length": str(len(data))})

    civitai.cdn_fault = fault
    reg = Registry.open(tmp_path / "reg")
    report = sync(_source(civitai), reg, tmp_path / "dl")
    assert report.failed == [] and len(report.ingest.added) == 3
    ranges = [r.headers.get("Range") for r in civitai.cdn_calls if r.path.endswith("lora2.safetensors")]
    assert len(ranges) == 2 and ranges[0] is None  # one cut, one resumed request
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(loras[2]) // 2  # from what the cut request had delivered


def test_sha256_mismatch_is_rejected_and_nothing_reaches_the_registry(civitai, tmp_path):
    civitai.blobs["lora1.safetensors"] = civitai.blobs["lora1.safetensors"][:-1] + b"\0"  # same size, other bytes
    reg = Registry.open(tmp_path / "reg")
    report = sync(_source(civitai), reg, tmp_path / "dl")
    assert [(f["key"], f["code"], f["retry"]) for f in report.failed] == [("civitai:11@101", "sha256_mismatch", False)]
    assert len(reg) == 2 and report.ingest.rejected == []
    assert len(_entries(tmp_path / "dl")) == 2
    assert not any((tmp_path / "dl" / STAGING).rglob("*.safetensors*"))  # the bad bytes were deleted


def test_file_vanished_between_listing_and_download(civitai, tmp_path):
    civitai.cdn_fault = lambda request, name: Response("gone", status=404) if name == "lora0.safetensors" else None
    reg = Registry.open(tmp_path / "reg")
    report = sync(_source(civitai), reg, tmp_path / "dl")
    assert [(f["key"], f["code"]) for f in report.failed] == [("civitai:10@100", "vanished")]
    assert len(reg) == 2 and len(_entries(tmp_path / "dl")) == 2


def test_endless_download_is_stopped_at_the_cap(civitai, tmp_path):
    def endless(request, name):
        if name != "lora0.safetensors":
            return None

        def forever():
            while True:
                yield b"\0" * 65536
        return Response(forever(), content_type="application/octet-stream")  # no Content-Length

    civitai.cdn_fault = endless
    source = _source(civitai, max_file_bytes=1 << 20)
    original = source.candidate

    def no_size(model, version):  # the listing promised no size: only the cap can stop it
        candidate = original(model, version)
        for file in candidate.files:
            file.size = None
        return candidate
    source.candidate = no_size
    reg = Registry.open(tmp_path / "reg")
    started = time.perf_counter()
    report = sync(source, reg, tmp_path / "dl")
    assert [(f["key"], f["code"]) for f in report.failed] == [("civitai:10@100", "too_large")]
    assert time.perf_counter() - started < 30
    assert len(reg) == 2 and len(_entries(tmp_path / "dl")) == 2
    assert not any((tmp_path / "dl" / STAGING).rglob("*.part"))


def test_a_transient_failure_is_retried_by_the_next_sync(civitai, tmp_path):
    civitai.cdn_fault = lambda request, name: Response("down", status=500) if name == "lora0.safetensors" else None
    reg = Registry.open(tmp_path / "reg")
    first = sync(_source(civitai), reg, tmp_path / "dl")
    assert [(f["code"], f["retry"]) for f in first.failed] == [("http", True)] and len(reg) == 2
    civitai.cdn_fault = None
    second = sync(_source(civitai), reg, tmp_path / "dl", first.cursor)
    assert second.discovered == 0 and second.downloaded == ["civitai:10@100"] and len(reg) == 3
    assert second.cursor["pending"] == []


def test_401_and_403_say_to_set_civitai_api_key(civitai, tmp_path):
    civitai.api_fault = lambda request: Response('{"error": "Unauthorized"}', status=401)
    reg = Registry.open(tmp_path / "reg")
    listing = sync(_source(civitai), reg, tmp_path / "dl")
    assert [f["code"] for f in listing.failed] == ["http"] and "(set CIVITAI_API_KEY)" in listing.failed[0]["reason"]
    civitai.api_fault = None
    civitai.cdn_fault = lambda request, name: Response("forbidden", status=403) if name == "lora0.safetensors" else None
    download = sync(_source(civitai), reg, tmp_path / "dl")
    assert [(f["key"], f["code"]) for f in download.failed] == [("civitai:10@100", "http")]
    assert "HTTP 403 (set CIVITAI_API_KEY)" in download.failed[0]["reason"] and len(reg) == 2
