"""Failed releases are never dropped silently: retryable ones are retried by every sync, the others kept
in the cursor and retried from the start (or once ``max_file_bytes`` changes); sizes are checked before
downloading; two syncs of one source do not race. Against the docs-shaped fake Civitai on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from test_sources_civitai import FakeCivitai
from werkzeug import Response

from pipelines.sources.civitai import CivitaiSource
from pipelines.sources.lock import lock_path, source_lock
from pipelines.sources.sync import failure_note, sync
from registry import Registry


@pytest.fixture
def civitai(httpserver, loras):
    return FakeCivitai(httpserver, loras)


def _source(civitai, **kw) -> CivitaiSource:
    return CivitaiSource(civitai.server.url_for("/").rstrip("/"), page_size=2, **kw)


def _lora_calls(civitai) -> list[str]:
    return [c.path for c in civitai.cdn_calls if c.path.endswith(".safetensors")]


def test_an_early_access_401_stays_pending_past_any_number_of_syncs(civitai, tmp_path):
    civitai.cdn_fault = lambda request, name: (Response('{"error":"early access"}', status=401)
                                               if name == "lora0.safetensors" else None)
    reg = Registry.open(tmp_path / "reg")
    cursor = None
    for _ in range(4):  # more than the three attempts it used to get
        report = sync(_source(civitai), reg, tmp_path / "dl", cursor)
        cursor = report.cursor
        assert [(f["key"], f["code"], f["retry"]) for f in report.failed] == [("civitai:10@100", "http", True)]
        assert "retried by every sync" in failure_note(report.failed[0])
    assert [p["attempts"] for p in cursor["pending"]] == [4]
    civitai.cdn_fault = None
    last = sync(_source(civitai), reg, tmp_path / "dl", cursor)
    assert last.downloaded == ["civitai:10@100"] and last.cursor["pending"] == [] and len(reg) == 3


def test_a_promised_size_over_the_cap_is_refused_before_downloading_and_retried_when_the_cap_changes(
        civitai, loras, tmp_path):
    reg = Registry.open(tmp_path / "reg")
    small = sync(_source(civitai, max_file_bytes=1000), reg, tmp_path / "dl")
    assert {f["code"] for f in small.failed} == {"too_large"} and len(small.failed) == 3
    assert all("max_file_bytes 1000" in f["reason"] and not f["retry"] for f in small.failed)
    assert _lora_calls(civitai) == []  # nothing was downloaded to find out
    assert "raise this source's max_file_bytes" in failure_note(small.failed[0])
    assert sorted(f["key"] for f in small.cursor["failed"]) == ["civitai:10@100", "civitai:11@101", "civitai:12@102"]
    same = sync(_source(civitai, max_file_bytes=1000), reg, tmp_path / "dl", small.cursor)
    assert same.failed == [] and len(same.cursor["failed"]) == 3 and _lora_calls(civitai) == []  # kept, quiet
    raised = sync(_source(civitai), reg, tmp_path / "dl", same.cursor)
    assert len(raised.downloaded) == 3 and raised.cursor["failed"] == [] and len(reg) == 3


def test_a_size_mismatch_is_named_so_and_a_sha256_mismatch_is_kept_until_a_sync_from_the_start(
        civitai, loras, tmp_path):
    civitai.blobs["lora1.safetensors"] = civitai.blobs["lora1.safetensors"][:-10]  # shorter than promised
    good2 = civitai.blobs["lora2.safetensors"]
    civitai.blobs["lora2.safetensors"] = good2[:-1] + b"\0"  # same size, other bytes
    reg = Registry.open(tmp_path / "reg")
    first = sync(_source(civitai), reg, tmp_path / "dl")
    assert sorted((f["key"], f["code"], f["retry"]) for f in first.failed) == [
        ("civitai:11@101", "size_mismatch", False), ("civitai:12@102", "sha256_mismatch", False)]
    assert "from_start=True tries it again" in failure_note(first.failed[0])
    quiet = sync(_source(civitai), reg, tmp_path / "dl", first.cursor)
    assert quiet.failed == [] and len(quiet.cursor["failed"]) == 2
    civitai.blobs["lora2.safetensors"] = good2  # fixed upstream
    full = sync(_source(civitai), reg, tmp_path / "dl", quiet.cursor, from_start=True)
    assert full.downloaded == ["civitai:12@102"] and [f["key"] for f in full.cursor["failed"]] == ["civitai:11@101"]


def test_two_syncs_of_one_source_at_once_do_not_race(civitai, tmp_path):
    def slow(request, name):
        time.sleep(0.3)  # a slow CDN: both syncs are downloading at the same time
        return None

    civitai.cdn_fault = slow
    reg = Registry.open(tmp_path / "reg")
    reports = []
    threads = [threading.Thread(target=lambda: reports.append(sync(_source(civitai), reg, tmp_path / "dl")))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [r.failed for r in reports] == [[], []]
    assert sorted(len(r.downloaded) for r in reports) == [0, 3] and len(reg) == 3
    assert len(_lora_calls(civitai)) == 3  # each file fetched once


def test_a_second_sync_waits_for_the_lock_and_says_so(tmp_path):
    path = lock_path(tmp_path / "dl", "civitai")
    path.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"h = open({str(path)!r}, 'a'); fcntl.flock(h, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(1.5)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        said, started = [], time.perf_counter()
        with source_lock(tmp_path / "dl", "civitai", said.append):
            waited = time.perf_counter() - started
    finally:
        holder.wait(10)
    assert waited > 0.5 and len(said) == 1 and "another sync of this source is running" in said[0]
