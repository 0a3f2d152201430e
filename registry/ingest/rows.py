"""The metadata columns of a LoRA row: built from its stored header and the sidecars of its
copies on disk (card first), with renders and captions kept paired; rebuilt when sidecars
change, when a copy is pruned or comes back (:func:`prune_and_refresh`)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from registry.captions import is_self_rendered, search_document
from registry.hashing import sha256_file
from registry.lora.metadata import (
    MAX_RENDER_BYTES, LoraMetadata, from_header, from_sidecars, header_then_sidecars, sidecar_files,
)
from registry.store.prune import prune
from registry.store.store import Store, where_in
from registry.text import embed_documents


def store_renders(reg: Store, meta: LoraMetadata, warnings: list[str] | None = None) -> list[str]:
    """Copy ``meta``'s render images into the blob store and return their blob paths (``""``: a
    render without an image here, e.g. a link). Only the images the sidecars' reading checked
    (``meta.render_images``) are copied. A render whose bytes are already among them (the same
    preview beside two copies of a file) is dropped from ``meta``: first one kept. One that cannot
    be copied now (unreadable, no longer a regular file under the size cap) keeps its prompt
    without an image, with a line in ``warnings`` (default: the list its sidecars reported to)."""
    warnings = meta.warnings if warnings is None else warnings
    paths, prompts, blobs = [], [], []
    for render, prompt in zip(meta.render_paths, meta.render_prompts):
        blob = ""
        if render in meta.render_images:
            try:
                blob = _put_render(reg, render)
            except FileNotFoundError:  # gone since it was checked: as a render never there
                pass
            except OSError as error:
                reason = f"unreadable: {error.strerror}" if error.strerror else str(error)
                message = f"ignored render {render}: {reason}"
                if warnings is not None and message not in warnings:
                    warnings.append(message)
            if blob and blob in blobs:
                continue
        paths.append(render), prompts.append(prompt), blobs.append(blob)
    meta.render_paths, meta.render_prompts = paths, prompts
    return blobs


def _put_render(reg: Store, render: str) -> str:
    """Copy one render image into the blob store; its blob path. ``OSError`` when it cannot be."""
    info = os.stat(render)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_RENDER_BYTES:
        raise OSError(f"no longer a regular file of at most {MAX_RENDER_BYTES:,} bytes")
    return str(reg.blobs.put(render, sha256_file(render), Path(render).suffix.lower()).relative_to(reg.root))


def card_first(paths: Iterable[str]) -> list[str]:
    """The paths of a LoRA's copies in the order their sidecars are read: those with a card (or
    a ``.civitai.info``) first, then by path. It depends on what is on disk alone, not on which
    copy was ingested first nor on whether they came in one run."""
    paths = sorted(paths)
    if len(paths) < 2:
        return paths

    def has_card(path: str) -> bool:
        return any(f.suffix in (".json", ".info") for f in sidecar_files(path))

    return sorted(paths, key=has_card, reverse=True)  # stable: path order among equals


def metadata_of(header: dict[str, str], paths: list[str], warnings: list[str] | None = None) -> LoraMetadata:
    """Header metadata, then every path's sidecars in order (:func:`header_then_sidecars`); the
    first stem names it last."""
    sidecars = LoraMetadata()
    for path in paths:
        sidecars.update(from_sidecars(path, name_from_stem=False, warnings=warnings))
    return header_then_sidecars(from_header(header), sidecars, Path(paths[0]).stem if paths else "")


def renders_and_captions(reg: Store, row: dict, meta: LoraMetadata, warnings: list[str] | None = None) -> dict:
    """The render and caption columns of ``row`` once its sidecars give ``meta``'s renders.

    Captions follow their renders' blobs: each render kept keeps its caption. Self-rendered
    renders (made by captioning because the LoRA had no image) are kept, with their captions,
    while the sidecars still bring no image of their own; once they bring one, they are dropped:
    the caption pass only self-renders a LoRA without any image, so a row with both could never
    come out of it, and the LoRA's own renders say more about it than its base's. When a render
    ends up without a caption, ``caption_model`` is cleared so that the next caption pass takes
    the row again (its captions stay paired, ``""`` for the ones missing, meanwhile). A render that
    cannot be copied is reported to ``warnings`` (:func:`store_renders`)."""
    blobs = store_renders(reg, meta, warnings)
    prompts = list(meta.render_prompts)
    old_prompts, old_blobs = list(row.get("render_prompts") or []), list(row.get("render_blobs") or [])
    old_captions, model = list(row.get("captions") or []), row.get("caption_model")
    if not any(blobs):  # no image of its own: the self-rendered fallback stays
        for prompt, blob in zip(old_prompts, old_blobs):
            if is_self_rendered(prompt) and blob and blob not in blobs and (reg.root / blob).is_file():
                prompts.append(prompt), blobs.append(blob)
    paired = len(old_captions) == len(old_blobs)
    caption_of = {b: c for b, c in zip(old_blobs, old_captions) if b} if paired else {}
    if not old_captions and model is None:  # never captioned: nothing to carry over
        captions = []
    else:
        captions = [caption_of.get(b, "") for b in blobs]
        if not paired or any(b and b not in caption_of for b in blobs):
            model = None
    return {"render_prompts": prompts, "render_blobs": blobs, "captions": captions, "caption_model": model}


def rebuild_row(reg: Store, row: dict, paths: Iterable[str], warnings: list[str] | None = None) -> None:
    """Rebuild ``row``'s metadata in place from its stored header and the sidecars of ``paths``
    (the copies of its file on disk), with its renders and captions kept paired; not its vector."""
    meta = metadata_of(json.loads(row["header_metadata"] or "{}"), card_first(paths), warnings)
    row.update(name=meta.name, description=meta.description, trigger_words=meta.trigger_words,
               tags=meta.tags, **renders_and_captions(reg, row, meta, warnings))
    row.update(search_text=search_document(row, row["captions"]),  # captions of kept renders stay searchable
               **source_fields(meta), removed=False)


def refreshed_rows(reg: Store, lora_ids: set[str], warnings: list[str] | None = None) -> list[dict]:
    """The rows of ``lora_ids`` with metadata rebuilt from the header stored and the sidecars of
    every present path (:func:`card_first` orders them), re-embedded, and ``removed`` cleared."""
    if not lora_ids:
        return []
    rows = reg.rows(reg.loras, where_in("lora_id", sorted(lora_ids)), len(lora_ids))
    for row in rows:
        rebuild_row(reg, row, [f["path"] for f in reg.paths_of(row["lora_id"]) if os.path.exists(f["path"])], warnings)
    for row, vector in zip(rows, embed_documents([r["search_text"] for r in rows])):
        row["text_vector"] = vector
    return rows


def prune_and_refresh(reg: Store) -> dict[str, int]:
    """:func:`registry.store.prune.prune`, then the rows of the LoRAs still on disk whose copies
    with sidecars vanished or came back (or that were restored) rebuilt from the sidecars of the
    copies still there, so a gone copy's card data leaves its LoRA's row (one write for all;
    ``refreshed`` counts them)."""
    columns = ["path", "lora_id", "gone", "sidecars"]
    before = {f["path"]: f for f in reg.column_rows(reg.files, columns)}
    removed = {r["lora_id"] for r in reg.column_rows(reg.loras, ["lora_id", "removed"]) if r["removed"]}
    counts = prune(reg)
    after = reg.column_rows(reg.files, ["path", "lora_id", "gone"])
    present = {f["lora_id"] for f in after if not f["gone"]}
    changed = {f["lora_id"] for f in after if f["path"] in before and before[f["path"]]["sidecars"]
               and bool(before[f["path"]]["gone"]) != bool(f["gone"])}
    rows = refreshed_rows(reg, (changed | removed) & present)
    reg.upsert(reg.loras, rows, "lora_id", update=True)
    return {**counts, "refreshed": len(rows)}


def source_fields(meta: LoraMetadata) -> dict:
    """Licence, NSFW level and source URL as the card or source states them; NULL when unstated."""
    return {"licence": meta.licence or None, "nsfw_level": meta.nsfw_level or None,
            "source_url": meta.source_url or None}
