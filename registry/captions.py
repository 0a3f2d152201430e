"""Captions of a LoRA's sample renders, stored on its row (``Registry.set_captions``).

``captions[i]`` is the caption of ``render_blobs[i]`` (``""`` where that render has no stored
image) and ``caption_model`` names the model that wrote them. Renders a LoRA did not come with,
made by its base model (``pipelines.caption_registry``), are stored like the others with their
prompt prefixed by :data:`SELF_RENDERED`. The search document becomes the card's document (as
ingest builds it, self-rendered prompts left out: they say nothing about the LoRA) followed by
the distinct captions, and its text vector is made again; every other column is kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa

from registry.lora.metadata import LoraMetadata
from registry.store.store import WRITE_TIMEOUT, Store, where_in
from registry.text import embed_documents

SELF_RENDERED = "[self-rendered] "  # prefix of the prompt of a render made by the LoRA's base
_WRITTEN = ("lora_id", "render_prompts", "render_blobs", "captions", "caption_model", "search_text",
            "text_vector")


def is_self_rendered(prompt: str | None) -> bool:
    """Whether a render prompt marks a render made by the registry, not published with the LoRA."""
    return bool(prompt) and prompt.startswith(SELF_RENDERED)


def search_document(row: Mapping, captions: Sequence[str]) -> str:
    """The full-text document of a LoRA row: its card's document, then its distinct captions."""
    meta = LoraMetadata(
        name=row.get("name") or "", description=row.get("description") or "",
        trigger_words=list(row.get("trigger_words") or []), tags=list(row.get("tags") or []),
        render_prompts=[p for p in row.get("render_prompts") or [] if not is_self_rendered(p)],
    )
    extra = [c.strip() for c in dict.fromkeys(captions) if c and c.strip()]
    return "\n".join(p for p in (meta.search_text(), *extra) if p)


def _check(lora_id: str, captions: object, model: object, prompts: list, blobs: list) -> None:
    if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
        raise TypeError(f"{lora_id}: captions must be a list of strings, not {captions!r}")
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"{lora_id}: the caption model must be a non-empty string, not {model!r}")
    if len(prompts) != len(blobs):
        raise ValueError(f"{lora_id}: {len(prompts)} render prompts for {len(blobs)} render blobs")
    if len(captions) != len(blobs):
        raise ValueError(f"{lora_id}: {len(captions)} captions for {len(blobs)} renders "
                         "(one caption per render, '' for a render without an image)")


def _renders(row: Mapping) -> tuple[list, list]:
    return list(row.get("render_prompts") or []), list(row.get("render_blobs") or [])


def set_captions(store: Store, updates: Mapping[str, tuple[Sequence[str], str]],
                 renders: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None, *,
                 seen: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None) -> int:
    """Store ``{lora_id: (captions, model)}`` in one write (one table version) and return the rows
    written. ``renders`` (``{lora_id: (prompts, blobs)}``, blobs relative to the registry root)
    replaces those rows' render lists in the same write. ``seen`` (``{lora_id: (prompts, blobs)}``
    as the row had them when its captions were planned): a row whose renders changed since (an
    ingest refreshed it while the captioner ran) is not written, so the new renders are not undone;
    the refresh left it for the next caption pass. (The rows are read again just before the write:
    a change within those milliseconds is not seen.) An unknown id, a missing blob or captions that
    do not pair with the renders raise before anything is written."""

    store._writable()
    renders = dict(renders or {})
    if not updates:
        return 0
    if set(renders) - set(updates):
        raise ValueError(f"renders given without captions for {sorted(set(renders) - set(updates))}")
    ids = sorted(updates)
    rows = {r["lora_id"]: r for r in store.rows(store.loras, where_in("lora_id", ids), len(ids),
                                                [c for c in _WRITTEN if c != "text_vector"]
                                                + ["name", "description", "trigger_words", "tags"])}
    unknown = [i for i in ids if i not in rows]
    if unknown:
        raise KeyError(f"no LoRA {', '.join(unknown)} in {store.root}")
    out = []
    for lora_id in ids:
        row, (captions, model) = rows[lora_id], updates[lora_id]
        if seen is not None and lora_id in seen and _renders(row) != tuple(map(list, seen[lora_id])):
            continue  # changed since the captions were planned
        prompts, blobs = renders.get(lora_id, (row["render_prompts"] or [], row["render_blobs"] or []))
        prompts, blobs = [str(p) for p in prompts], [str(b) for b in blobs]
        _check(lora_id, captions, model, prompts, blobs)
        missing = [b for b in blobs if b and not (store.root / b).is_file()]
        if missing:
            raise FileNotFoundError(f"{lora_id}: render blobs not in {store.root}: {missing}")
        row.update(render_prompts=prompts, render_blobs=blobs, captions=list(captions), caption_model=model)
        row["search_text"] = search_document(row, captions)
        out.append({c: row[c] for c in _WRITTEN if c != "text_vector"})
    if not out:
        return 0
    for row, vector in zip(out, embed_documents([r["search_text"] for r in out]), strict=True):
        row["text_vector"] = vector
    schema = pa.schema([store.loras.schema.field(c) for c in _WRITTEN])
    store.loras.merge_insert("lora_id").when_matched_update_all().execute(
        pa.Table.from_pylist(out, schema=schema), timeout=WRITE_TIMEOUT)
    return len(out)
