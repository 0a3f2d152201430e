"""Civitai as a LoRA source: its public REST API (``/api/v1/models``, cursor-paged) and its
download URLs (a 307 redirect to a signed CDN URL), through ``requests``.

A candidate is one model version (``id`` = model id, ``revision`` = version id). Version ids
only grow, so the cursor is the highest version id seen: a crawl sorted ``Newest`` stops at the
first page with nothing newer. (A new version of an *old* model may sit deep in that order; a
full crawl, ``cursor=None``, finds it.)
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import requests

from pipelines.sources.base import Candidate, Cursor, RemoteFile, Render, SourceError, safe_name
from pipelines.sources.http import download, get_json, make_session

CIVITAI_API = "https://civitai.com"
TOKEN_ENV = "CIVITAI_API_KEY"
AUTH_HINT = f"set {TOKEN_ENV}"  # added to a 401/403
_NSFW_LEVELS = {1: "pg", 2: "pg13", 4: "r", 8: "x", 16: "xxx"}


class CivitaiSource:
    """Civitai models of ``types`` for ``base_models`` (default: LoRAs for FLUX.1 D)."""

    def __init__(self, base_url: str = CIVITAI_API, *, token: str | None = None,
                 base_models: tuple[str, ...] = ("Flux.1 D",), types: tuple[str, ...] = ("LORA",),
                 page_size: int = 100, max_pages: int | None = None, nsfw: bool = True,
                 max_file_bytes: int = 2 << 30, max_render_bytes: int = 20 << 20, renders_per_version: int = 4,
                 session: requests.Session | None = None, name: str = "civitai") -> None:
        self.name, self.base_url = name, base_url.rstrip("/")
        self.base_models, self.types, self.page_size, self.max_pages = base_models, types, page_size, max_pages
        self.nsfw, self.max_file_bytes, self.max_render_bytes = nsfw, max_file_bytes, max_render_bytes
        self.renders_per_version = renders_per_version
        self.session = session or make_session(token or os.environ.get(TOKEN_ENV))
        self.pages_read = 0
        self.listed_all: set[tuple[str, str]] | None = None  # every version, when the last crawl was complete

    # ---- discovery ---------------------------------------------------------------------
    def discover(self, cursor: Cursor | None) -> tuple[list[Candidate], Cursor]:
        """Versions newer than the cursor's ``after_version``. With ``max_pages``, a crawl stops
        early and the cursor keeps the page to resume from (``resume``) and the mark to adopt
        once the crawl completes (``pending_mark``)."""
        cursor = dict(cursor or {})
        mark = int(cursor.get("after_version", 0))
        best = max(mark, int(cursor.get("pending_mark", 0)))
        page_cursor = cursor.get("resume")
        everything: set[tuple[str, str]] | None = set() if not mark and not page_cursor else None
        self.listed_all = None
        found: list[Candidate] = []
        pages = 0
        while True:
            params = {"types": list(self.types), "baseModels": list(self.base_models), "limit": self.page_size,
                      "sort": "Newest", "nsfw": str(self.nsfw).lower()}
            if page_cursor:
                params["cursor"] = page_cursor
            data = get_json(self.session, f"{self.base_url}/api/v1/models", params, auth_hint=AUTH_HINT)
            pages += 1
            self.pages_read += 1
            newer = 0
            for model in data.get("items") or []:
                for version in (model.get("modelVersions") or []) if isinstance(model, dict) else []:
                    vid = int(version.get("id") or 0)
                    if everything is not None:
                        everything.add((str(model.get("id") or version.get("modelId")), str(vid)))
                    if vid > mark:
                        newer += 1
                        best = max(best, vid)
                        candidate = self.candidate(model, version)
                        if candidate.files:
                            found.append(candidate)
            page_cursor = (data.get("metadata") or {}).get("nextCursor")
            done = not page_cursor or (mark and not newer)
            if done:
                self.listed_all = everything
                return found, {"after_version": best}
            if self.max_pages is not None and pages >= self.max_pages:
                return found, {"after_version": mark, "pending_mark": best, "resume": page_cursor}

    def candidate(self, model: dict, version: dict) -> Candidate:
        """A candidate from a model and one of its versions (API JSON)."""
        files = [self._file(f) for f in version.get("files") or [] if _is_safetensors_model(f)]
        renders = [Render(RemoteFile(safe_name(urlsplit(str(img["url"])).path), str(img["url"])),
                          str((img.get("meta") or {}).get("prompt") or ""), _nsfw(img.get("nsfwLevel")))
                   for img in (version.get("images") or []) if isinstance(img, dict) and img.get("url")]
        mid, vid = model.get("id") or version.get("modelId"), version.get("id")
        commercial = model.get("allowCommercialUse")
        licence = "civitai" + (f" (commercial use: {', '.join(commercial) if isinstance(commercial, list) else commercial})"
                               if commercial is not None else "")
        return Candidate(
            source=self.name, id=str(mid), revision=str(vid),
            name=str(model.get("name") or version.get("name") or ""),
            files=files, trigger_words=[str(w) for w in version.get("trainedWords") or [] if str(w).strip()],
            renders=renders[: self.renders_per_version], licence=licence,
            nsfw_level=_nsfw(version.get("nsfwLevel", model.get("nsfwLevel", "x" if model.get("nsfw") else ""))),
            base_model=str(version.get("baseModel") or ""),
            page_url=f"{_web_url(self.base_url)}/models/{mid}?modelVersionId={vid}",
            description=str(version.get("description") or model.get("description") or ""),
            tags=[str(t) for t in model.get("tags") or [] if isinstance(t, str)],
        )

    @staticmethod
    def _file(data: dict) -> RemoteFile:
        size_kb = data.get("sizeKB")
        size = size_kb * 1024 if isinstance(size_kb, (int, float)) else None
        hashes = data.get("hashes") or {}
        return RemoteFile(name=safe_name(str(data.get("name") or f"{data.get('id')}.safetensors")),
                          url=str(data.get("downloadUrl") or ""),
                          size=int(size) if size is not None and float(size).is_integer() else None,
                          sha256=str(hashes.get("SHA256") or "").lower() or None)

    # ---- download ----------------------------------------------------------------------
    def fetch(self, candidate: Candidate, file: RemoteFile, dest_dir: Path) -> Path:
        """Download one file (a LoRA, or a render) into ``dest_dir``, verified and capped."""
        if not file.url:
            raise SourceError("unsupported", f"{candidate.key}: {file.name} has no download URL")
        is_render = any(r.file is file for r in candidate.renders)
        cap, limit_name = ((self.max_render_bytes, "max_render_bytes") if is_render
                           else (self.max_file_bytes, "max_file_bytes"))
        return download(self.session, file.url, Path(dest_dir) / safe_name(file.name), size=file.size,
                        sha256=file.sha256, max_bytes=cap, auth_hint=AUTH_HINT, limit_name=limit_name)


def _is_safetensors_model(data: object) -> bool:
    if not isinstance(data, dict) or data.get("type", "Model") != "Model":
        return False
    fmt = str((data.get("metadata") or {}).get("format") or "")
    return fmt == "SafeTensor" or str(data.get("name", "")).lower().endswith(".safetensors")


def _nsfw(level: object) -> str:
    if isinstance(level, bool):
        return "x" if level else ""
    if isinstance(level, int):
        return _NSFW_LEVELS.get(level, str(level))
    return str(level or "").lower()


def _web_url(api_base: str) -> str:
    return api_base.removesuffix("/api")
