"""Discover → download (verified) → sidecars → ``Registry.add``, for any source.

Each release is fetched into ``DOWNLOAD/.staging/SOURCE/RELEASE/`` (partial downloads stay
there to be resumed), gets a card ``STEM.json`` per LoRA file, and only when every LoRA file of
it is complete is the folder renamed into ``DOWNLOAD/SOURCE/RELEASE/``; the registry ingests
``DOWNLOAD/SOURCE`` only, so it never sees a half-written release (:mod:`pipelines.sources.releases`).
One sync of a downloading source runs at a time (:mod:`pipelines.sources.lock`: a second one waits).

Failures are recorded in the report and never stop the run. Those a later sync may get past
(:attr:`SourceError.retryable`: network, 5xx, 429, 401/403) stay in the cursor's ``pending`` and are
retried by every sync. The others (``sha256_mismatch``, ``size_mismatch``, ``too_large``,
``vanished``, ``unsupported``) stay in its ``failed`` with their reason, and are retried by a sync
``from_start`` (``autolora sync --from-start``), a ``too_large`` one also as soon as the source's
``max_file_bytes`` differs from the one it failed under.

A release listed again (a full crawl) whose metadata changed upstream gets its cards rewritten, so
the ingest that follows refreshes its row (``refreshed``); releases on disk that a complete listing
no longer has (deleted upstream) are reported in ``gone_upstream``, never deleted.

Files the registry rejects are tried again by a later sync where the rejection can change without
the file changing (:data:`RETRIED_REJECTIONS`: ``unknown_base`` until the base is registered,
``unreadable``). For a downloading source that costs nothing extra: every sync ingests the whole
``DOWNLOAD/SOURCE`` folder (known files settle from a stat, rejected ones are inspected again) and
downloads are kept, so nothing is fetched twice. An in-place source (a local folder) leaves such
files out of its cursor (:meth:`pipelines.sources.local.LocalSource.forget`), so they are
discovered again; files rejected for what they hold (not a LoRA, a pickle, ...) stay seen until
they change.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.sources.base import Candidate, Cursor, Source, SourceError, safe_name
from pipelines.sources.lock import STAGING, source_lock
from pipelines.sources.releases import (IMAGE_SUFFIXES, card_for, fetch_release, gone_upstream,  # noqa: F401
                                        releases_on_disk, supersede)

if TYPE_CHECKING:
    from registry import Registry
    from registry.ingest import IngestReport

# rejection codes a later sync may see differently although the file did not change
RETRIED_REJECTIONS = frozenset({"unknown_base", "unreadable"})


@dataclass
class SyncReport:
    """What one :func:`sync` did. ``failed``: ``{key, file, code, reason, retry}`` per failure
    (``retry``: retried by the next sync; else kept in the cursor's ``failed``); ``refreshed``: releases
    on disk whose cards were rewritten (their metadata changed upstream); ``gone_upstream``: releases on
    disk that a complete listing no longer has; ``enriched``: cards a local source got from Civitai;
    ``warnings``: renders that could not be fetched (the LoRA is kept without them)."""

    discovered: int = 0
    downloaded: list[str] = field(default_factory=list)
    already_present: list[str] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    gone_upstream: list[str] = field(default_factory=list)
    enriched: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ingest: IngestReport | None = None
    cursor: Cursor = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able summary."""
        return {"discovered": self.discovered, "downloaded": self.downloaded,
                "already_present": self.already_present, "refreshed": self.refreshed, "failed": self.failed,
                "gone_upstream": self.gone_upstream, "enriched": self.enriched, "warnings": self.warnings,
                "ingest": self.ingest.to_dict() if self.ingest else None, "cursor": self.cursor}


def failure_note(failure: dict, from_start: str = "a sync with from_start=True") -> str:
    """What happens next to a failed release, for the line reporting it (``from_start``: how the
    reader asks for a sync from the start)."""
    if failure.get("retry"):
        return "retried by every sync until it succeeds"
    if failure["code"] == "too_large":
        return f"not retried: raise this source's max_file_bytes (it is retried then), or run {from_start}"
    return f"not retried: {from_start} tries it again"


def sync(source: Source, registry: Registry | None, download_dir: str | os.PathLike,
         cursor: Cursor | None = None, *, from_start: bool = False) -> SyncReport:
    """Discover what is new in ``source`` since ``cursor`` (all of it when ``from_start``: the kept
    failures are retried too), download it under ``download_dir``, and ingest ``download_dir/SOURCE``
    into ``registry`` (skipped when ``None``). The report's ``cursor`` is the one to pass next time."""
    if getattr(source, "in_place", False):
        return _sync_in_place(source, registry, None if from_start else cursor)
    with source_lock(download_dir, source.name):
        return _sync_download(source, registry, Path(download_dir), dict(cursor or {}), from_start)


def _sync_download(source: Source, registry: Registry | None, download_dir: Path, cursor: Cursor,
                   from_start: bool) -> SyncReport:
    final_root = download_dir / safe_name(source.name)
    staging_root = download_dir / STAGING / safe_name(source.name)
    final_root.mkdir(parents=True, exist_ok=True)
    report = SyncReport()
    try:
        found, source_cursor = source.discover(None if from_start else cursor.get("source"))
        listed_all = getattr(source, "listed_all", None)
    except SourceError as error:  # the listing failed: keep the old cursor, retry next time
        report.failed.append({"key": source.name, "file": "", "code": error.code, "reason": error.reason,
                              "retry": True})
        found, source_cursor, listed_all = [], cursor.get("source"), None
    report.failed.extend(getattr(source, "failures", None) or [])  # listed, but unreadable: listed again
    report.discovered = len(found)
    queue = {c.key: (c, 0) for c in found}
    for entry in cursor.get("pending", []):
        candidate = Candidate.from_dict(entry["candidate"])
        queue[candidate.key] = (queue.get(candidate.key, (candidate,))[0], int(entry.get("attempts", 0)))
    kept_failed = []
    for entry in cursor.get("failed", []):
        candidate = Candidate.from_dict(entry["candidate"])
        if from_start or _setting_changed(source, entry):
            queue.setdefault(candidate.key, (candidate, 0))
        elif candidate.key not in queue:
            kept_failed.append(entry)
    pending = []
    releases = None
    for candidate, attempts in queue.values():
        error = fetch_release(source, candidate, final_root, staging_root, report)
        if error is None:
            if getattr(source, "superseding_revisions", False):
                releases = releases_on_disk(final_root) if releases is None else releases
                report.refreshed.extend(supersede(candidate, releases))
            continue
        failure = {"key": candidate.key, "file": getattr(error, "file", ""), "code": error.code,
                   "reason": error.reason, "retry": error.retryable}
        report.failed.append(failure)
        if error.retryable:
            pending.append({"candidate": candidate.to_dict(), "attempts": attempts + 1})
        else:
            shutil.rmtree(staging_root / candidate.folder_name, ignore_errors=True)
            kept_failed.append({**failure, "candidate": candidate.to_dict(),
                                **_settings(source, error.code)})
    if listed_all is not None:
        report.gone_upstream = gone_upstream(releases_on_disk(final_root), listed_all)
    report.cursor = {"source": source_cursor, "pending": pending, "failed": kept_failed}
    if registry is not None:
        report.ingest = registry.add([final_root])
    return report


def _settings(source: Source, code: str) -> dict:
    """The setting a failure depends on, kept with it: it is retried once that changes."""
    return {"max_file_bytes": getattr(source, "max_file_bytes", None)} if code == "too_large" else {}


def _setting_changed(source: Source, entry: dict) -> bool:
    return "max_file_bytes" in entry and entry["max_file_bytes"] != getattr(source, "max_file_bytes", None)


def _sync_in_place(source: Source, registry: Registry | None, cursor: Cursor | None) -> SyncReport:
    """A source whose files are already local: ingest the changed ones where they are."""
    try:
        found, new = source.discover((cursor or {}).get("source"))
    except SourceError as error:  # e.g. the folder is missing: keep the old cursor
        return SyncReport(failed=[{"key": source.name, "file": "", "code": error.code, "reason": error.reason,
                                   "retry": True}], cursor={"source": (cursor or {}).get("source"), "pending": []})
    paths = [c.id for c in found if os.path.exists(c.id)]
    skipped = list(getattr(source, "skipped", []))  # links, FIFOs, unreadable folders it walked past
    enriched = []
    if getattr(source, "enricher", None) is not None:  # cards from Civitai for new files without one
        new, enriched, warnings = source.enrich(found, new)
        skipped += warnings
    ingest = registry.add(paths) if registry is not None and paths else None
    retried = {os.path.realpath(r["path"]) for r in (ingest.rejected if ingest else [])
               if r["code"] in RETRIED_REJECTIONS}
    forget = getattr(source, "forget", None)
    if retried and forget is not None:  # not seen: discovered again next time
        new = forget(new, [c.id for c in found if os.path.realpath(c.id) in retried])
    return SyncReport(discovered=len(found), ingest=ingest, warnings=skipped, enriched=enriched,
                      cursor={"source": new, "pending": []})
