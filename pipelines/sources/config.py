"""The configured sources: one TOML file of ``[[source]]`` tables.

``kind = "local" | "hub" | "civitai"``, ``enabled`` (default true), ``name`` (default: the
kind) and the options of that source's class (``folder`` for local; ``filter``, ``endpoint``,
``page_size``, ``max_models``, ``max_file_bytes`` for the Hub; ``base_url``, ``base_models``,
``types``, ``page_size``, ``max_pages``, ``max_file_bytes`` for Civitai). Tokens come from the
environment (``HF_TOKEN``, ``CIVITAI_API_KEY``), never from this file.
"""

from __future__ import annotations

import inspect
import os
import tomllib
from pathlib import Path

from pipelines.sources.base import Source

_TOKEN_KEYS = {"token", "api_key", "apikey"}


def _classes() -> dict[str, type]:
    from pipelines.sources.civitai import CivitaiSource
    from pipelines.sources.hub import HubSource
    from pipelines.sources.local import LocalSource

    return {"local": LocalSource, "hub": HubSource, "civitai": CivitaiSource}


def load_sources(path: str | os.PathLike, *, include_disabled: bool = False) -> list[Source]:
    """The sources configured in ``path`` (enabled ones unless ``include_disabled``); a bad
    entry raises ``ValueError`` naming it. Relative local folders are relative to the file."""
    path = Path(path)
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    classes, sources, names = _classes(), [], set()
    for i, entry in enumerate(data.get("source", [])):
        where = f"{path}: [[source]] #{i + 1}"
        options = dict(entry)
        kind = options.pop("kind", None)
        enabled = options.pop("enabled", True)
        if kind not in classes:
            raise ValueError(f"{where}: kind must be one of {sorted(classes)}, not {kind!r}")
        if _TOKEN_KEYS & set(options):
            raise ValueError(f"{where}: put tokens in the environment (HF_TOKEN, CIVITAI_API_KEY), not here")
        options.setdefault("name", kind)
        if options["name"] in names:
            raise ValueError(f"{where}: duplicate source name {options['name']!r}")
        names.add(options["name"])
        if kind == "local":
            options["folder"] = path.parent / Path(options.get("folder", "loras")).expanduser()
        for key in ("base_models", "types"):
            if key in options:
                options[key] = tuple(options[key])
        allowed = set(inspect.signature(classes[kind]).parameters) - {"session"}
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {sorted(unknown)} for kind {kind!r}")
        if enabled or include_disabled:
            sources.append(classes[kind](**options))
    return sources
