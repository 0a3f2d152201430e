"""Discover → download (verified) → sidecars → ``Registry.add``, for any source.

Each release is fetched into ``DOWNLOAD/.staging/SOURCE/RELEASE/`` (partial downloads stay
there to be resumed), gets a card ``STEM.json`` per LoRA file, and only when every LoRA file of
it is complete is the folder renamed into ``DOWNLOAD/SOURCE/RELEASE/``; the registry ingests
``DOWNLOAD/SOURCE`` only, so it never sees a half-written release. Failures are recorded in the
report and kept in the cursor (``pending``) to be retried by the next sync, up to
``max_attempts``; they never stop the run.

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

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.sources.base import Candidate, Cursor, Source, SourceError, safe_name

if TYPE_CHECKING:
    from registry import Registry
    from registry.ingest import IngestReport

STAGING = ".staging"
# rejection codes a later sync may see differently although the file did not change
RETRIED_REJECTIONS = frozenset({"unknown_base", "unreadable"})
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class SyncReport:
    """What one :func:`sync` did. ``failed``: ``{key, file, code, reason, retry}`` per failure;
    ``warnings``: renders that could not be fetched (the LoRA is kept without them)."""

    discovered: int = 0
    downloaded: list[str] = field(default_factory=list)
    already_present: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ingest: IngestReport | None = None
    cursor: Cursor = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able summary."""
        return {"discovered": self.discovered, "downloaded": self.downloaded,
                "already_present": self.already_present, "failed": self.failed,
                "warnings": self.warnings, "ingest": self.ingest.to_dict() if self.ingest else None,
                "cursor": self.cursor}


def card_for(candidate: Candidate, renders: list[dict]) -> dict:
    """The sidecar card written next to each LoRA file of ``candidate``."""
    return {"name": candidate.name, "description": candidate.description,
            "trigger_words": candidate.trigger_words, "tags": candidate.tags,
            "base_model": candidate.base_model, "renders": renders, "licence": candidate.licence,
            "nsfw_level": candidate.nsfw_level, "source": candidate.source, "source_id": candidate.id,
            "source_revision": candidate.revision, "source_url": candidate.page_url}


def sync(source: Source, registry: Registry | None, download_dir: str | os.PathLike,
         cursor: Cursor | None = None, *, max_attempts: int = 3) -> SyncReport:
    """Discover what is new in ``source`` since ``cursor``, download it under ``download_dir``,
    and ingest ``download_dir/SOURCE`` into ``registry`` (skipped when ``None``). The report's
    ``cursor`` is the one to pass next time."""
    if getattr(source, "in_place", False):
        return _sync_in_place(source, registry, cursor)
    download_dir = Path(download_dir)
    final_root = download_dir / safe_name(source.name)
    staging_root = download_dir / STAGING / safe_name(source.name)
    final_root.mkdir(parents=True, exist_ok=True)
    cursor = dict(cursor or {})
    pending = [(Candidate.from_dict(p["candidate"]), int(p["attempts"])) for p in cursor.get("pending", [])]
    report = SyncReport()
    try:
        found, source_cursor = source.discover(cursor.get("source"))
    except SourceError as error:  # the listing failed: keep the old cursor, retry next time
        report.failed.append({"key": source.name, "file": "", "code": error.code, "reason": error.reason,
                              "retry": True})
        found, source_cursor = [], cursor.get("source")
    report.discovered = len(found)
    queue = [(c, 0) for c in found if c.key not in {p.key for p, _ in pending}] + pending
    still_pending = []
    for candidate, attempts in queue:
        error = _one(source, candidate, final_root, staging_root, report)
        if error is not None:
            retry = error.retryable and attempts + 1 < max_attempts
            report.failed.append({"key": candidate.key, "file": getattr(error, "file", ""), "code": error.code,
                                  "reason": error.reason, "retry": retry})
            if retry:
                still_pending.append({"candidate": candidate.to_dict(), "attempts": attempts + 1})
            else:
                shutil.rmtree(staging_root / candidate.folder_name, ignore_errors=True)
    report.cursor = {"source": source_cursor, "pending": still_pending}
    if registry is not None:
        report.ingest = registry.add([final_root])
    return report


def _sync_in_place(source: Source, registry: Registry | None, cursor: Cursor | None) -> SyncReport:
    """A source whose files are already local: ingest the changed ones where they are."""
    try:
        found, new = source.discover((cursor or {}).get("source"))
    except SourceError as error:  # e.g. the folder is missing: keep the old cursor
        return SyncReport(failed=[{"key": source.name, "file": "", "code": error.code, "reason": error.reason,
                                   "retry": True}], cursor={"source": (cursor or {}).get("source"), "pending": []})
    paths = [c.id for c in found if os.path.exists(c.id)]
    skipped = list(getattr(source, "skipped", []))  # links, FIFOs, unreadable folders it walked past
    ingest = registry.add(paths) if registry is not None and paths else None
    retried = {os.path.realpath(r["path"]) for r in (ingest.rejected if ingest else [])
               if r["code"] in RETRIED_REJECTIONS}
    forget = getattr(source, "forget", None)
    if retried and forget is not None:  # not seen: discovered again next time
        new = forget(new, [c.id for c in found if os.path.realpath(c.id) in retried])
    return SyncReport(discovered=len(found), ingest=ingest, warnings=skipped, cursor={"source": new, "pending": []})


def _one(source: Source, candidate: Candidate, final_root: Path, staging_root: Path,
         report: SyncReport) -> SourceError | None:
    """Fetch one release into staging and move it into place; the error, if any."""
    final = final_root / candidate.folder_name
    if final.exists():
        report.already_present.append(candidate.key)
        return None
    stage = staging_root / candidate.folder_name
    stage.mkdir(parents=True, exist_ok=True)
    loras = []
    for file in candidate.files:
        try:
            loras.append(source.fetch(candidate, file, stage))
        except SourceError as error:
            error.file = file.name
            return error
        except OSError as error:  # disk full, permissions: recorded, never raised
            failure = SourceError("network", f"{file.name}: {error}")
            failure.file = file.name
            return failure
    renders = []
    scratch = stage / "_renders"  # apart from the LoRAs: a render can never overwrite one
    for i, render in enumerate(candidate.renders):
        try:
            scratch.mkdir(exist_ok=True)
            path = source.fetch(candidate, render.file, scratch)
        except (SourceError, OSError) as error:
            report.warnings.append(f"{candidate.key}: render {render.file.name} skipped: {error}")
            continue
        suffix = path.suffix.lower() if path.suffix.lower() in IMAGE_SUFFIXES else ".png"
        image = stage / f"render-{i}{suffix}"  # never a name the ingest would take for a LoRA
        os.replace(path, image)
        renders.append({"image": image.name, "prompt": render.prompt, "nsfw_level": render.nsfw_level})
    shutil.rmtree(scratch, ignore_errors=True)
    for lora in loras:
        card = lora.with_name(f"{lora.name[: -len(lora.suffix)] if lora.suffix else lora.name}.json")
        card.write_text(json.dumps(card_for(candidate, renders), indent=1), encoding="utf-8")
    for leftover in stage.iterdir():  # scratch folders (``_hub``, ``_renders``) and cut renders
        if leftover.is_dir() and leftover.name.startswith("_"):
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.name.endswith(".part"):
            leftover.unlink()
    os.replace(stage, final)  # the one step that makes the release visible
    report.downloaded.append(candidate.key)
    return None
