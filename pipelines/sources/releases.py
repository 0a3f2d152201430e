"""One release on disk: ``DOWNLOAD/SOURCE/RELEASE/`` holds its LoRA files, a card ``STEM.json`` per
LoRA file (:func:`card_for`) and its renders ``render-I.EXT`` (named by the card, with the URL each
came from). Fetched into ``DOWNLOAD/.staging/SOURCE/RELEASE/`` and renamed into place whole.

A release listed again (a full crawl) whose metadata or renders changed upstream gets its cards
rewritten and its new renders fetched, never its LoRA files (:func:`refresh_release`); for a source
whose new revision replaces the old one (a Hub repo's commit) the older revisions' cards are rewritten
with the current metadata, so that trigger words the repo dropped do not live on (:func:`supersede`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.sources.base import Candidate, Source, SourceError, safe_name
from registry.atomic_write import write_atomically

if TYPE_CHECKING:
    from pipelines.sources.sync import SyncReport

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
Releases = dict[str, list[tuple[Path, dict]]]  # source id -> (release folder, its card) per release on disk


def card_for(candidate: Candidate, renders: list[dict]) -> dict:
    """The sidecar card written next to each LoRA file of ``candidate``."""
    return {"name": candidate.name, "description": candidate.description,
            "trigger_words": candidate.trigger_words, "tags": candidate.tags,
            "base_model": candidate.base_model, "renders": renders, "licence": candidate.licence,
            "nsfw_level": candidate.nsfw_level, "source": candidate.source, "source_id": candidate.id,
            "source_revision": candidate.revision, "source_url": candidate.page_url}


def fetch_release(source: Source, candidate: Candidate, final_root: Path, staging_root: Path,
                  report: SyncReport) -> SourceError | None:
    """Fetch one release into staging and move it into place (or refresh it when it is there
    already); the error, if any."""
    final = final_root / candidate.folder_name
    stage = staging_root / candidate.folder_name
    if final.exists():
        done = report.refreshed if refresh_release(source, candidate, final, stage, report) else report.already_present
        done.append(candidate.key)
        return None
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
    renders = _fetch_renders(source, candidate, stage, report, {})
    for lora in loras:
        _card_path(lora).write_text(json.dumps(card_for(candidate, renders), indent=1), encoding="utf-8")
    for leftover in stage.iterdir():  # scratch folders (``_hub``, ``_renders``) and cut renders
        if leftover.is_dir() and leftover.name.startswith("_"):
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.name.endswith(".part"):
            leftover.unlink()
    os.replace(stage, final)  # the one step that makes the release visible
    report.downloaded.append(candidate.key)
    return None


def refresh_release(source: Source, candidate: Candidate, final: Path, stage: Path, report: SyncReport) -> bool:
    """Rewrite the cards of the release in ``final`` when ``candidate`` (as listed now) says other
    things (name, description, trigger words, tags, ...) or lists other renders; new renders are
    fetched (those already here, by URL, are kept). Whether anything was rewritten."""
    cards = sorted(final.glob("*.json"))
    if not cards:
        return False
    old = _read_card(cards[0]) or {}
    old_renders = [r for r in old.get("renders") or [] if isinstance(r, dict) and r.get("image")]
    same_meta = all(old.get(k) == v for k, v in card_for(candidate, []).items() if k != "renders")
    same_renders = len(old_renders) == len(candidate.renders) and all(
        r.get("prompt", "") == c.prompt and r.get("url", c.file.url) == c.file.url
        for r, c in zip(old_renders, candidate.renders))
    if same_meta and same_renders:
        return False
    renders = old_renders
    if not same_renders:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        here = {r["url"]: final / safe_name(str(r["image"])) for r in old_renders if r.get("url")}
        fetched = _fetch_renders(source, candidate, stage, report, {u: p for u, p in here.items() if p.is_file()})
        if len(fetched) == len(candidate.renders):  # else keep the old ones: the next full crawl tries again
            for image in final.glob("render-*"):
                image.unlink()
            for render in fetched:
                os.replace(stage / render["image"], final / render["image"])
            renders = fetched
        shutil.rmtree(stage, ignore_errors=True)
    for card in cards:
        write_atomically(card, json.dumps(card_for(candidate, renders), indent=1))
    return True


def releases_on_disk(final_root: Path) -> Releases:
    """The releases under ``final_root`` by source id, each with its card (folders without one are left out)."""
    found: Releases = {}
    for folder in sorted(p for p in final_root.iterdir() if p.is_dir()) if final_root.is_dir() else []:
        card = next((c for c in map(_read_card, sorted(folder.glob("*.json"))) if c and c.get("source_id")), None)
        if card is not None:
            found.setdefault(str(card["source_id"]), []).append((folder, card))
    return found


def supersede(candidate: Candidate, releases: Releases) -> list[str]:
    """Rewrite the cards of the older revisions of ``candidate``'s id on disk with its metadata, without
    renders (those of the current revision describe it); the keys of those rewritten."""
    rewritten = []
    for folder, old in releases.get(candidate.id, []):
        revision = str(old.get("source_revision") or "")
        if revision == candidate.revision:
            continue
        card = {**card_for(candidate, []), "source_revision": revision, "superseded_by": candidate.revision}
        paths = [p for p in sorted(folder.glob("*.json")) if _read_card(p) != card]
        for path in paths:
            write_atomically(path, json.dumps(card, indent=1))
        if paths:
            rewritten.append(f"{candidate.source}:{candidate.id}@{revision}")
    return rewritten


def gone_upstream(releases: Releases, listed: set[tuple[str, str | None]]) -> list[str]:
    """The keys of the releases on disk that a complete listing ``listed`` no longer has."""
    gone = []
    for source_id, found in releases.items():
        for _, card in found:
            revision = str(card.get("source_revision") or "")
            if (source_id, revision) not in listed and (source_id, None) not in listed:
                gone.append(f"{card.get('source')}:{source_id}@{revision}")
    return sorted(gone)


def _fetch_renders(source: Source, candidate: Candidate, stage: Path, report: SyncReport,
                   here: dict[str, Path]) -> list[dict]:
    """``candidate``'s renders as ``stage/render-I.EXT`` (copied from ``here``, by URL, when there),
    each as the card lists it; one that cannot be fetched is a warning."""
    renders = []
    scratch = stage / "_renders"  # apart from the LoRAs: a render can never overwrite one
    for i, render in enumerate(candidate.renders):
        try:
            scratch.mkdir(exist_ok=True)
            if render.file.url in here:
                path = Path(shutil.copyfile(here[render.file.url], scratch / f"kept{here[render.file.url].suffix}"))
            else:
                path = source.fetch(candidate, render.file, scratch)
        except (SourceError, OSError) as error:
            report.warnings.append(f"{candidate.key}: render {render.file.name} skipped: {error}")
            continue
        suffix = path.suffix.lower() if path.suffix.lower() in IMAGE_SUFFIXES else ".png"
        image = stage / f"render-{i}{suffix}"  # never a name the ingest would take for a LoRA
        os.replace(path, image)
        renders.append({"image": image.name, "prompt": render.prompt, "nsfw_level": render.nsfw_level,
                        "url": render.file.url})
    shutil.rmtree(scratch, ignore_errors=True)
    return renders


def _card_path(lora: Path) -> Path:
    return lora.with_name(f"{lora.name[: -len(lora.suffix)] if lora.suffix else lora.name}.json")


def _read_card(path: Path) -> dict | None:
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return card if isinstance(card, dict) else None
