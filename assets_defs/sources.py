"""Source discovery in Dagster: one sensor per source configured in ``sources.toml``, each
requesting a ``synced_loras`` run (download, verify, ingest: ``pipelines.sources.sync.sync``)
when its source lists something new.

A source's cursor is kept in the registry, where ``autolora sync`` keeps it
(``REGISTRY/sync/SOURCE.cursor.json``, :func:`pipelines.sources.cursors.cursor_path`): the sensor reads
it, each run carries in its config the cursor it starts from (a failed run re-executed from the UI
redoes the same window) and writes back the cursor its sync ends with. So a registry's cursor says
what *that* registry has seen (a new registry is synced from the start), and a local file rejected
with a retryable code (``unknown_base``, ``unreadable``) is left out of it and listed again. The run
key (source + registry, its base names, the cursor and the listing) is unique per new listing, and
a file still waiting for its base is tried again once the registry's bases change.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets_defs.resources import RegistryResource
from pipelines.sources.base import Source, SourceError
from pipelines.sources.cursors import cursor_path, load_cursor, save_cursor
from pipelines.sources.config import (DEFAULT_SOURCES_FILE, DOWNLOAD_DIR, SOURCES_FILE, configured_source,
                                      load_sources)
from pipelines.sources.lock import sync_lock
from pipelines.sources.sync import failure_note, sync


class SyncConfig(dg.Config):
    """Which source to sync, from which cursor (JSON; empty: from the start)."""

    source: str = Field(description="the name of an enabled entry of the sources file")
    cursor: str = Field("", description="the source's cursor as JSON (the sensor passes it); empty: from the start")
    sources_file: str = Field(SOURCES_FILE, description="the sources file ($AUTOLORA_SOURCES)")
    download_dir: str = Field(DOWNLOAD_DIR, description="where downloads are staged ($AUTOLORA_DOWNLOAD_DIR)")
    from_start: bool = Field(False, description="list the source in full (as `autolora sync --from-start`): cards "
                                                "changed upstream are rewritten, kept failures retried")


@dg.asset(group_name="registry", kinds={"lancedb"}, pool="registry_writes")
def synced_loras(context: dg.AssetExecutionContext, config: SyncConfig,
                 registry: RegistryResource) -> dg.MaterializeResult:
    """New releases of a configured source downloaded (verified, staged) and ingested. A run beside another
    sync of the same source (a CLI `autolora sync`) waits for it."""
    source = configured_source(config.sources_file, config.source)
    reg = registry.open(create=True)
    with sync_lock(source, config.download_dir, context.log.info):
        report = sync(source, reg, config.download_dir, json.loads(config.cursor) if config.cursor else None,
                      from_start=config.from_start)
        save_cursor(cursor_path(reg.root, source.name), report.cursor)  # where the sensor and `autolora sync` read it
    for failure in report.failed:
        context.log.warning(f"{failure['key']} {failure['file']}: {failure['code']}: {failure['reason']} "
                            f"({failure_note(failure, 'a run with from_start: true')})")
    if report.gone_upstream:
        context.log.warning(f"{len(report.gone_upstream)} downloaded release(s) no longer listed upstream, kept: "
                            f"{', '.join(report.gone_upstream)}")
    for warning in report.warnings:
        context.log.warning(warning)
    ingest = report.ingest
    for rejected in ingest.rejected if ingest else []:
        context.log.warning(f"rejected {rejected['path']}: {rejected['reason']}")
    return dg.MaterializeResult(metadata={
        "source": source.name, "discovered": report.discovered, "downloaded": len(report.downloaded),
        "already_present": len(report.already_present), "cards_refreshed": len(report.refreshed),
        "failed": len(report.failed), "gone_upstream": len(report.gone_upstream),
        **{what: len(getattr(ingest, what)) if ingest else 0
           for what in ("added", "duplicates", "refreshed", "unchanged", "rejected")},  # as ingested_loras says
        "next_cursor": dg.MetadataValue.json(report.cursor),
    })


source_sync_job = dg.define_asset_job("source_sync_job", selection=[synced_loras])


def _sensor_name(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", source) + "_source_sensor"


def source_sensor(name: str, sources_file: str = SOURCES_FILE, download_dir: str = DOWNLOAD_DIR,
                  minimum_interval_seconds: int = 300) -> dg.SensorDefinition:
    """The discovery sensor of source ``name``: one run request per new listing."""

    @dg.sensor(name=_sensor_name(name), job=source_sync_job, minimum_interval_seconds=minimum_interval_seconds,
               default_status=dg.DefaultSensorStatus.STOPPED, description=f"new LoRAs in source {name!r}")
    def _discover(context: dg.SensorEvaluationContext, registry: RegistryResource) -> dg.SensorResult | dg.SkipReason:
        from registry.store.store import RegistryNotFound, user_path

        try:
            source = configured_source(sources_file, name)
        except ValueError as error:  # disabled, renamed or broken since the code location was loaded
            return dg.SkipReason(f"{error}; reload the code location to apply edits of {sources_file}")
        root = user_path(registry.path)  # what Registry.open makes of it
        try:
            bases = registry.open_existing().base_names()
        except RegistryNotFound:  # the run creates it
            bases = []
        start = load_cursor(cursor_path(root, name)) or {}  # what the last run left (none: from the start)
        try:
            found, listed = source.discover(start.get("source"))
        except SourceError as error:  # the listing failed: try again next tick
            if error.code == "missing":  # a local folder that is not there
                return dg.SkipReason(f"{name}: {error.reason}: create it, or set this source's folder "
                                     f"in {sources_file}")
            return dg.SkipReason(f"{name}: listing failed: {error}")
        unread = getattr(source, "failures", None) or []  # listed but unreadable (a Hub repo): read again next tick
        if not found and not start.get("pending"):
            return dg.SkipReason(f"nothing new in {name}" + (f"; {len(unread)} listed but unreadable, retried next "
                                                             f"tick, e.g. {unread[0]['key']}: {unread[0]['reason']}"
                                                             if unread else ""))
        window = json.dumps({"registry": str(root.absolute()), "bases": bases, "start": start, "listed": listed},
                            sort_keys=True)
        run_key = f"{name}:{hashlib.sha256(window.encode()).hexdigest()[:16]}"
        config = {"source": name, "cursor": json.dumps(start, sort_keys=True) if start else "",
                  "sources_file": sources_file, "download_dir": download_dir}
        request = dg.RunRequest(run_key=run_key, run_config={"ops": {"synced_loras": {"config": config}}},
                                tags={"autolora/source": name, "autolora/candidates": str(len(found))})
        return dg.SensorResult(run_requests=[request])

    return _discover


def _enabled_sources(sources_file: str | None, warn: bool) -> tuple[Path, list[Source]]:
    """The sources file (argument, ``$AUTOLORA_SOURCES``, else ``sources.toml`` in the working
    directory) and its enabled sources; see :func:`source_sensors` for the errors."""
    explicit = sources_file or os.environ.get("AUTOLORA_SOURCES")
    path = Path(explicit or DEFAULT_SOURCES_FILE)
    if not path.is_file():
        if explicit:
            via = "" if sources_file else f"AUTOLORA_SOURCES={explicit}: "
            raise ValueError(f"{via}no such sources file: {path.absolute()}")
        if warn:
            dg.get_dagster_logger().warning(f"no source sensors: no sources file at {path.absolute()} (the default "
                                            f"{DEFAULT_SOURCES_FILE} of the working directory; set AUTOLORA_SOURCES)")
        return path, []
    sources = load_sources(path)
    if not sources and warn:
        dg.get_dagster_logger().warning(f"no source sensors: {path.absolute()} has no enabled [[source]] entry")
    return path, sources


def source_sensors(sources_file: str | None = None, download_dir: str = DOWNLOAD_DIR) -> list[dg.SensorDefinition]:
    """One sensor per enabled source in ``sources_file`` (default: ``$AUTOLORA_SOURCES``, else ``sources.toml``
    in the working directory). A file named explicitly (argument or variable) that is missing, or any error
    in the file, raises one ``ValueError`` naming it; a missing default ``sources.toml`` warns and makes none."""
    path, sources = _enabled_sources(sources_file, warn=True)
    return [source_sensor(s.name, str(path), download_dir) for s in sources]


def source_crawl_schedules(sources_file: str | None = None, download_dir: str = DOWNLOAD_DIR,
                           cron_schedule: str = "0 5 * * 6") -> list[dg.ScheduleDefinition]:
    """One weekly full crawl (``from_start``, Saturdays 05:00 UTC) per enabled downloading source (Hub,
    Civitai): the sensors only see what is new since their cursor, so edits upstream to releases already
    downloaded (trigger words, descriptions, previews) and deletions reach the registry this way. A local
    folder needs none: every sync settles its files from their stats."""
    path, sources = _enabled_sources(sources_file, warn=False)
    schedules = []
    for source in sources:
        if getattr(source, "in_place", False):
            continue
        config = {"source": source.name, "from_start": True, "sources_file": str(path), "download_dir": download_dir}
        schedules.append(dg.ScheduleDefinition(
            name=re.sub(r"[^A-Za-z0-9_]", "_", source.name) + "_full_crawl_schedule", job=source_sync_job,
            cron_schedule=cron_schedule, execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.STOPPED,
            run_config={"ops": {"synced_loras": {"config": config}}},
            description=f"a full crawl of source {source.name!r}: cards edited upstream rewritten, deletions "
                        "reported, kept failures retried"))
    return schedules
