"""Captioning in Dagster: the vLLM captioner as a resource, and the ``lora_captions`` asset."""


import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets_defs.ingest import ingested_loras
from assets_defs.resources import RegistryResource
from assets_defs.sources import synced_loras
from pipelines.caption import DEFAULT_PROMPT, Captioner
from pipelines.caption_registry import caption_registry, idle_report, pending_captions
from pipelines.captioner_endpoint import CaptionerEndpoint
from pipelines.vllm_server import VLLMServerError
from registry import RegistryNotWritable

DEMO_BASE = ("autolora-demo-flux", ".autolora/world/default-seed0/base")


class CaptionerResource(dg.ConfigurableResource):
    """An OpenAI-compatible captioning endpoint: ``url`` attaches to a running server (left
    running); otherwise ``model_dir`` (a model folder or a Hub id) is served by vLLM from
    ``.venv-vllm`` for the duration of :meth:`connect` (ready once ``/v1/models`` answers; its
    process group, by PID, stopped after). ``max_model_len`` / ``dtype`` default to the CPU
    settings for a tiny model (null: vLLM's choice, e.g. on a GPU); ``extra_args`` go to the server."""

    url: str = Field(os.environ.get("AUTOLORA_CAPTIONER_URL", ""),
                     description="a running OpenAI-compatible server to attach to ($AUTOLORA_CAPTIONER_URL)")
    model_dir: str = Field(os.environ.get("AUTOLORA_CAPTIONER_MODEL", ""),
                           description="else: a model folder or Hub id served by vLLM ($AUTOLORA_CAPTIONER_MODEL)")
    served_name: str = Field("", description="the model name to ask for; empty: the first model a URL lists, "
                                             "the model folder's name and a hash of it, or the Hub id")
    max_model_len: int | None = Field(256, description="vLLM --max-model-len (null: vLLM's choice, e.g. on a GPU)")
    dtype: str | None = Field("float32", description="vLLM --dtype (null: vLLM's choice)")
    extra_args: list[str] = Field([], description="more vLLM server arguments")
    prompt: str = Field(DEFAULT_PROMPT, description="the captioning instruction sent with each image")
    cache_dir: str = Field(os.environ.get("AUTOLORA_CAPTION_CACHE", ".autolora/caption-cache"),
                           description="captions cached by image hash and model")
    concurrency: int = Field(4, description="requests in flight")
    timeout: float = Field(120.0, description="seconds per request")
    max_tokens: int = Field(64, description="caption length limit in tokens")
    startup_timeout: float = Field(600.0, description="seconds to wait for a launched server to answer")

    def endpoint(self) -> CaptionerEndpoint:
        """These settings as a :class:`pipelines.captioner_endpoint.CaptionerEndpoint`."""
        return CaptionerEndpoint(**{name: getattr(self, name) for name in CaptionerEndpoint.__dataclass_fields__})

    def model_name(self) -> str | None:
        """The model id captions will carry, when known without asking a server."""
        return self.endpoint().model_name()

    @contextmanager
    def connect(self) -> Iterator[tuple[Captioner, dict]]:
        """A :class:`Captioner` on the endpoint, and ``{base_url, model, pid, start_seconds}``."""
        with self.endpoint().connect() as connected:
            yield connected


def _default_bases() -> dict[str, str]:
    """``$AUTOLORA_BASE_PIPELINES`` (JSON: base model name -> pipeline), else the demo base when built."""
    given = os.environ.get("AUTOLORA_BASE_PIPELINES")
    if not given:
        return {DEMO_BASE[0]: DEMO_BASE[1]} if Path(DEMO_BASE[1]).is_dir() else {}
    try:
        bases = json.loads(given)
    except json.JSONDecodeError as error:
        bases = error
    if not (isinstance(bases, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in bases.items())):
        raise ValueError(f"AUTOLORA_BASE_PIPELINES={given!r} is not a JSON object of base model name -> pipeline "
                         f"folder or Hub id ({bases if isinstance(bases, Exception) else 'wrong shape'}), e.g. "
                         '{"FLUX.1-dev": "black-forest-labs/FLUX.1-dev"}')
    return bases


class CaptionConfig(dg.Config):
    """Self-rendering of LoRAs that came without sample renders."""

    self_render: bool = Field(True, description="render LoRAs that came without sample renders, then caption those")
    n_renders: int = Field(3, description="renders per such LoRA")
    base_pipelines: dict[str, str] = Field(_default_bases(), description="base model name -> diffusers pipeline "
                                                                         "folder ($AUTOLORA_BASE_PIPELINES)")


@dg.asset(group_name="registry", kinds={"vllm", "lancedb"}, deps=[ingested_loras, synced_loras],
          pool="registry_writes")
def lora_captions(context: dg.AssetExecutionContext, config: CaptionConfig, registry: RegistryResource,
                  captioner: CaptionerResource) -> dg.MaterializeResult:
    """Every sample render captioned by the vision model (only LoRAs lacking its captions; those
    without renders rendered by their base first); captions feed full-text search and training.
    The run fails (what was captioned is kept) on a registry it cannot write to, when the server
    died or stopped answering, or when every LoRA it tried failed; some failures are warnings."""
    if not (captioner.url or captioner.model_dir):
        raise dg.Failure("no captioner: set AUTOLORA_CAPTIONER_URL (a running OpenAI-compatible server) or "
                         "AUTOLORA_CAPTIONER_MODEL (a model folder or Hub id to serve with vLLM), or the captioner "
                         "resource's url / model_dir", allow_retries=False)
    reg = registry.open()
    try:
        reg.check_writable()
    except RegistryNotWritable as error:
        raise dg.Failure(str(error), allow_retries=False) from None
    model = captioner.model_name()
    pending = pending_captions(reg, model, config.base_pipelines, config.self_render) if model is not None else None
    report, server = None, {"pid": None, "start_seconds": 0.0}
    try:
        if pending == 0:  # no server started for nothing
            report = idle_report(reg, model, config.self_render)
        else:
            with captioner.connect() as (cap, server):
                report = caption_registry(reg, cap, base_pipelines=config.base_pipelines,
                                          self_render=config.self_render, n_renders=config.n_renders)
    except VLLMServerError as error:  # did not come up, or died while captioning (its log's end in the text)
        done = f" ({report.captioned} LoRAs captioned before, kept)" if report else ""
        raise dg.Failure(f"captioning server: {error}{done}") from None
    for problem in report.skipped + report.failed:
        context.log.warning(f"{problem['lora_id']} ({problem.get('name', '')}): {problem['reason']}")
    metadata = _metadata(report, server, reg.version)
    if report.stopped:
        raise dg.Failure(f"captioning stopped: {report.stopped}; {report.captioned} LoRAs captioned (kept), "
                         f"{report.left} left for the next run", metadata=metadata)
    if report.failed and not report.captioned:
        raise dg.Failure(f"every LoRA tried failed ({len(report.failed)}), e.g. {report.failed[0]['lora_id']}: "
                         f"{report.failed[0]['reason']}", metadata=metadata)
    return dg.MaterializeResult(metadata=metadata)


def _metadata(report, server: dict, version: int) -> dict:
    """The run's metadata from a :class:`pipelines.caption_registry.CaptionReport`."""
    return {
        "model": report.model, "captioned": report.captioned, "up_to_date": report.up_to_date,
        "images": report.images, "requests": report.requests, "cached": report.cached,
        "self_rendered": len(report.self_rendered), "left": report.left,
        "skipped": len(report.skipped), "failed": len(report.failed),
        "caption_seconds": round(report.caption_seconds, 2), "render_seconds": round(report.render_seconds, 2),
        "images_per_second": round(report.images_per_second, 3),
        "seconds_per_request": round(report.caption_seconds / report.requests, 3) if report.requests else 0.0,
        "server_started": server["pid"] is not None, "server_start_seconds": server["start_seconds"],
        "registry_version": version,
    }
