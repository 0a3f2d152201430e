"""Metadata for a bare local LoRA file from Civitai, looked up by its sha256
(``/api/v1/model-versions/by-hash/{sha256}``): name, trigger words, description, previews and
their prompts, written as a card ``STEM.json`` plus ``STEM.preview-I.EXT`` images beside it,
which the shared ingest reads. An existing card is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pipelines.sources.base import SourceError
from pipelines.sources.civitai import AUTH_HINT, CivitaiSource
from pipelines.sources.releases import IMAGE_SUFFIXES, card_for
from registry.atomic_write import write_atomically
from registry.hashing import sha256_file


def enrich_by_hash(path: str | os.PathLike, civitai: CivitaiSource, *, sha256: str | None = None) -> Path | None:
    """Write ``STEM.json`` (and previews) for the LoRA at ``path`` if Civitai knows its sha256.
    Returns the card written, ``None`` when the hash is unknown there or a card already exists;
    network and server errors raise :class:`SourceError`."""
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    card_path = path.with_name(f"{stem}.json")
    if card_path.exists():
        return None
    digest = sha256 or sha256_file(path)
    from pipelines.sources.http import get_json

    try:
        version = get_json(civitai.session, f"{civitai.base_url}/api/v1/model-versions/by-hash/{digest}",
                           auth_hint=AUTH_HINT)
    except SourceError as error:
        if error.code == "vanished":  # 404: Civitai does not know this file
            return None
        raise
    model = version.get("model") if isinstance(version.get("model"), dict) else {}
    model = {"id": version.get("modelId"), **model}
    candidate = civitai.candidate(model, version)
    renders = []
    scratch = Path(tempfile.mkdtemp(prefix=".enrich-", dir=path.parent))  # no remote name lands beside the LoRA
    for i, render in enumerate(candidate.renders):
        suffix = Path(render.file.name).suffix.lower()
        target = path.with_name(f"{stem}.preview-{i}{suffix if suffix in IMAGE_SUFFIXES else '.png'}")
        try:
            fetched = civitai.fetch(candidate, render.file, scratch)
            os.replace(fetched, target)
        except (SourceError, OSError):
            continue  # a preview that cannot be fetched loses the preview only
        renders.append({"image": target.name, "prompt": render.prompt, "nsfw_level": render.nsfw_level})
    shutil.rmtree(scratch, ignore_errors=True)
    write_atomically(card_path, json.dumps(card_for(candidate, renders), indent=1))
    return card_path
