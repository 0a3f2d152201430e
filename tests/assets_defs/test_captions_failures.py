"""``lora_captions`` fails its run, with one clear message, when it cannot do its job: a registry it
cannot write to (before any server starts) and a pass where every LoRA failed (a broken endpoint on
127.0.0.1 stands in for the server); a pass where only some failed materialises with warnings."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import dagster as dg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from caption_fixtures import broken_endpoint, captioning_registry  # noqa: E402

from assets_defs.captions import CaptionerResource, lora_captions  # noqa: E402
from assets_defs.resources import RegistryResource  # noqa: E402

CONFIG = {"ops": {"lora_captions": {"config": {"self_render": False}}}}


def _run(root: Path, url: str) -> dg.ExecuteInProcessResult:
    return dg.materialize([lora_captions], run_config=CONFIG, raise_on_error=False,
                          resources={"registry": RegistryResource(path=str(root)),
                                     "captioner": CaptionerResource(url=url, cache_dir="", concurrency=1)},
                          instance=dg.DagsterInstance.ephemeral())


def _failure(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    event = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    return event.step_failure_data.user_failure_data.description or event.step_failure_data.error.message


def test_every_lora_failing_fails_the_run_and_some_failing_does_not(micro_world, tmp_path):
    reg = captioning_registry(micro_world, tmp_path)
    with broken_endpoint() as start:
        rejecting = start(lambda n: "400")
        message = _failure(_run(reg.root, rejecting.url.removesuffix("/v1")))
        assert "every LoRA tried failed (2)" in message and "longer than the maximum model length" in message
        second_rejected = start(lambda n: "400" if n == 2 else "ok")  # one render of 3, in order: one LoRA fails
        result = _run(reg.root, second_rejected.url.removesuffix("/v1"))
    assert result.success
    meta = result.asset_materializations_for_node("lora_captions")[0].metadata
    assert (meta["captioned"].value, meta["failed"].value, meta["images"].value) == (1, 1, meta["requests"].value)


def test_a_registry_that_cannot_be_written_fails_the_run_before_any_server(micro_world, tmp_path, monkeypatch):
    reg = captioning_registry(micro_world, tmp_path)

    def refused(*args, **kwargs):  # as a read-only mount answers (root ignores permission bits)
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    message = _failure(_run(reg.root, "http://127.0.0.1:1"))  # nothing listens there: never asked
    assert message.startswith("cannot write to the registry at ") and "Read-only file system" in message
