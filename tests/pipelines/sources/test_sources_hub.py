"""Hub source against the real ``olah`` mirror server (offline mode) serving git mirrors built
here: one git repo per model with a model card, LFS pointer files and the LFS objects under
``.git/lfs/objects`` (so the sha256 olah reports is the content's). ``huggingface_hub`` makes
every call; ``olah_server.py`` adds the Hub's ``/api/models`` listing (olah has none) and two
answers olah's offline mirrors lack (see there). The mirror itself (server, git mirrors) is
``tests/hub_mirror.py``, shared with the generation tests.

olah runs from its own venv (its pins downgrade psutil): ``python3.11 -m venv .venv-olah &&
.venv-olah/bin/pip install olah==0.5.4`` at the repo root, or ``OLAH_PYTHON=/path/to/python``.
"""

from __future__ import annotations

import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
from source_fixtures import png_bytes, sha256

import huggingface_hub.constants as hf_constants
from pipelines.sources.hub import FLUX_DEV_ADAPTERS, HubSource
from pipelines.sources.sync import STAGING, sync
from registry import Registry

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hub_mirror import Olah, running_olah  # noqa: E402

LORA_TAGS = ["lora", FLUX_DEV_ADAPTERS, "base_model:black-forest-labs/FLUX.1-dev"]  # each listed repo's tags


def card(i: int) -> str:
    return (f"---\nlicense: other\nbase_model: black-forest-labs/FLUX.1-dev\ntags:\n- lora\n"
            f"instance_prompt: trig{i}\nwidget:\n- text: a paper lantern, trig{i}\n  output:\n"
            f"    url: images/example.png\n---\n# Lantern {i}\n")


@pytest.fixture
def olah(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # tests/conftest.py sets it for the rest
    with running_olah(tmp_path / "olah", tags=LORA_TAGS) as server:
        yield server


def _populate(olah: Olah, loras: list[bytes]) -> dict[str, str]:
    shas = {}
    for i, data in enumerate(loras):
        shas[f"org{i}/lantern-{i}"] = olah.add(f"org{i}/lantern-{i}", {
            "lantern.safetensors": data, "images/example.png": png_bytes(20 * i)}, card(i),
            f"2025-01-0{i + 1}T00:00:00")
    return shas


def test_hub_crawl_pinned_to_commits_downloads_verifies_and_ingests(olah, loras, tmp_path):
    shas = _populate(olah, loras)
    source = HubSource(endpoint=olah.url)
    started = time.perf_counter()
    found, cursor = source.discover(None)
    seconds = time.perf_counter() - started
    pages = olah.listing_pages()
    started = time.perf_counter()
    for _ in range(10):  # the listing alone: pages/s through huggingface_hub's Link paging
        list(source.api.list_models(filter=FLUX_DEV_ADAPTERS, sort="last_modified", full=True))
    listing_rate = (olah.listing_pages() - pages) / (time.perf_counter() - started)
    assert [c.id for c in found] == ["org2/lantern-2", "org1/lantern-1", "org0/lantern-0"]  # newest first
    lantern = found[1]
    assert lantern.revision == shas["org1/lantern-1"] and lantern.trigger_words == ["trig1"]
    assert lantern.files[0].sha256 == sha256(loras[1]) and lantern.files[0].size == len(loras[1])
    assert lantern.renders[0].prompt == "a paper lantern, trig1" and lantern.licence == "other"
    print(f"\nhub discovery: {pages} listing pages + {len(found)} model_info in {seconds:.2f} s; "
          f"listing alone {listing_rate:.0f} pages/s")

    reg = Registry.open(tmp_path / "reg")
    report = sync(source, reg, tmp_path / "dl")
    assert report.failed == [] and len(report.ingest.added) == 3, report.to_dict()
    rows = {r["name"]: r for r in reg.column_rows(reg.loras, ["name", "trigger_words", "render_prompts", "render_blobs"])}
    assert rows["lantern-1"]["trigger_words"] == ["trig1"]
    assert rows["lantern-1"]["render_prompts"] == ["a paper lantern, trig1"] and rows["lantern-1"]["render_blobs"][0]
    assert not list((tmp_path / "dl" / STAGING / "hub").iterdir())

    # a new commit to one repo: only that repo is rediscovered, at its new sha
    new_sha = olah.add("org0/lantern-0", {"lantern.safetensors": loras[0], "extra.txt": b"x"}, card(0),
                       "2025-02-01T00:00:00")
    again = sync(source, reg, tmp_path / "dl", report.cursor)
    assert again.downloaded == [f"hub:org0/lantern-0@{new_sha}"] and again.failed == []
    assert again.ingest.added == [] and len(reg) == 3  # same weights: a duplicate, not a new LoRA
    assert sync(source, reg, tmp_path / "dl", again.cursor).discovered == 0


def test_hub_sha256_mismatch_is_rejected(olah, loras, tmp_path):
    _populate(olah, loras[:1])
    obj = next((olah.mirrors / "models" / "org0" / "lantern-0" / ".git" / "lfs" / "objects").rglob("*"))
    while obj.is_dir():
        obj = next(obj.iterdir())
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xFF  # the stored object no longer matches its pointer's sha256
    obj.write_bytes(bytes(data))
    reg = Registry.open(tmp_path / "reg")
    report = sync(HubSource(endpoint=olah.url), reg, tmp_path / "dl")
    assert [f["code"] for f in report.failed] == ["sha256_mismatch"] and len(reg) == 0
    assert not (tmp_path / "dl" / "hub").exists() or not list((tmp_path / "dl" / "hub").iterdir())
    assert not any((tmp_path / "dl").rglob("*.safetensors"))


def test_hub_repo_vanished_between_listing_and_download(olah, loras, tmp_path):
    _populate(olah, loras[:2])
    source = HubSource(endpoint=olah.url)
    found, cursor = source.discover(None)
    shutil.rmtree(olah.mirrors / "models" / "org1")  # deleted after the listing
    from pipelines.sources.base import SourceError

    with pytest.raises(SourceError) as error:
        source.fetch(found[0], found[0].files[0], tmp_path / "stage")
    assert error.value.code == "vanished"
    fetched = source.fetch(found[1], found[1].files[0], tmp_path / "stage")
    assert sha256(fetched.read_bytes()) == sha256(loras[0])


def test_hub_file_over_the_cap_is_not_downloaded(olah, loras, tmp_path):
    _populate(olah, loras[:1])
    reg = Registry.open(tmp_path / "reg")
    report = sync(HubSource(endpoint=olah.url, max_file_bytes=1000), reg, tmp_path / "dl")
    assert [f["code"] for f in report.failed] == ["too_large"] and len(reg) == 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_network_failure_is_a_source_error(monkeypatch):
    """A refused connection (httpx ConnectError) and offline mode are ``network`` errors, not tracebacks."""
    from pipelines.sources.base import SourceError

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    source = HubSource(endpoint=f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(SourceError, match="ConnectError") as error:
        source.candidate("org/lora", None)  # model_info: not retried by huggingface_hub
    assert error.value.code == "network"
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError) as error:
        source.discover(None)
    assert error.value.code == "network"


def test_hub_401_and_403_say_to_set_hf_token(httpserver, monkeypatch):
    from werkzeug import Response

    from pipelines.sources.base import SourceError

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    httpserver.expect_request("/api/models").respond_with_response(
        Response('{"error": "Invalid credentials in Authorization header"}', status=401,
                 content_type="application/json"))
    httpserver.expect_request("/api/models/org/gated").respond_with_response(
        Response('{"error": "Access to model org/gated is restricted."}', status=403,
                 headers={"X-Error-Code": "GatedRepo"}, content_type="application/json"))
    source = HubSource(endpoint=httpserver.url_for("/").rstrip("/"))
    with pytest.raises(SourceError, match=r"listing: HTTP 401 \(set HF_TOKEN\)") as listing:
        source.discover(None)
    with pytest.raises(SourceError, match=r"org/gated: HTTP 403 \(set HF_TOKEN\)") as gated:
        source.candidate("org/gated", None)
    assert listing.value.code == gated.value.code == "http"
