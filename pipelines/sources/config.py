"""The configured sources: one TOML file of ``[[source]]`` tables.

Each entry has ``kind = "local" | "hub" | "civitai"``, ``enabled`` (default true), ``name``
(default: the kind) and the options of that kind, declared with their types in :data:`SCHEMAS`
(one ``TypedDict`` per kind) and checked generically: a wrong type, a non-positive count, an
unknown key, a TOML syntax error or a missing file is one ``ValueError`` naming the file (and the entry).
Defaults are the source classes' own. Tokens come from the environment (``HF_TOKEN``,
``CIVITAI_API_KEY``), never from this file.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypedDict, get_args, get_origin, get_type_hints

from pipelines.sources.base import Source
from pipelines.sources.local import DEMO_LORAS

DEFAULT_SOURCES_FILE = "sources.toml"  # relative to the working directory
SOURCES_FILE = os.environ.get("AUTOLORA_SOURCES", DEFAULT_SOURCES_FILE)  # the CLI's and the Dagster sensors' default
DOWNLOAD_DIR = os.environ.get("AUTOLORA_DOWNLOAD_DIR", ".autolora/downloads")
_TOKEN_KEYS = {"token", "api_key", "apikey"}


@dataclass(frozen=True)
class AtLeast:
    """``Annotated[int, AtLeast(n)]``: an integer ``>= n`` (and ``<= most`` when given)."""

    n: int
    most: int | None = None


@dataclass(frozen=True)
class HttpUrl:
    """``Annotated[str, HttpUrl()]``: a string starting with ``http://`` or ``https://``."""


Url = Annotated[str, HttpUrl()]
Positive = Annotated[int, AtLeast(1)]
NonNegative = Annotated[int, AtLeast(0)]
CIVITAI_MAX_PAGE = 100  # the largest page /api/v1/models serves
PageSize = Annotated[int, AtLeast(1, most=CIVITAI_MAX_PAGE)]
PATH_KEYS = ("folder",)  # values where ~ and $VARS expand


class _Entry(TypedDict, total=False):
    kind: str
    name: str
    enabled: bool


class LocalEntry(_Entry, total=False):
    """``folder``: relative to the TOML file (default: the demo world's ``loras/``; ``~`` and ``$VARS``
    expand); ``enrich``: the name of a ``civitai`` entry of the file (enabled or not) through which
    new LoRA files without a card get one, looked up by their sha256."""

    folder: str
    enrich: str


class HubEntry(_Entry, total=False):
    """Options of :class:`pipelines.sources.hub.HubSource`."""

    filter: str
    endpoint: Url
    max_models: Positive
    max_file_bytes: Positive
    renders_per_model: NonNegative


class CivitaiEntry(_Entry, total=False):
    """Options of :class:`pipelines.sources.civitai.CivitaiSource`."""

    base_url: Url
    base_models: list[str]
    types: list[str]
    page_size: PageSize
    max_pages: Positive
    nsfw: bool
    max_file_bytes: Positive
    max_render_bytes: Positive
    renders_per_version: NonNegative


SCHEMAS: dict[str, type] = {"local": LocalEntry, "hub": HubEntry, "civitai": CivitaiEntry}


def _classes() -> dict[str, type]:
    from pipelines.sources.civitai import CivitaiSource
    from pipelines.sources.hub import HubSource
    from pipelines.sources.local import LocalSource

    return {"local": LocalSource, "hub": HubSource, "civitai": CivitaiSource}


def _type_name(hint: object) -> str:
    if get_origin(hint) is Annotated:
        bound = get_args(hint)[1]
        if isinstance(bound, HttpUrl):
            return "an http:// or https:// URL"
        if bound.most is not None:
            return f"an integer from {bound.n} to {bound.most}"
        return "a positive integer" if bound.n == 1 else f"an integer >= {bound.n}"
    if get_origin(hint) is list:
        return f"a list of {_type_name(get_args(hint)[0]).removeprefix('a ')}s"
    return {str: "a string", bool: "true or false", int: "an integer"}[hint]


def _valid(value: object, hint: object) -> bool:
    """Whether ``value`` (as TOML parsed it) has the type ``hint`` declares."""
    if get_origin(hint) is Annotated:
        base, bound = get_args(hint)[0], get_args(hint)[1]
        if isinstance(bound, HttpUrl):
            return _valid(value, base) and value.startswith(("http://", "https://"))
        return _valid(value, base) and value >= bound.n and (bound.most is None or value <= bound.most)
    if get_origin(hint) is list:
        return isinstance(value, list) and all(_valid(v, get_args(hint)[0]) for v in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def check_entry(entry: object, where: str) -> dict:
    """``entry`` checked against its kind's schema; raises ``ValueError`` starting with ``where``."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a table, not {entry!r}")
    kind = entry.get("kind")
    if kind not in SCHEMAS:
        raise ValueError(f"{where}: kind must be one of {sorted(SCHEMAS)}, not {kind!r}")
    if _TOKEN_KEYS & set(entry):
        raise ValueError(f"{where}: put tokens in the environment (HF_TOKEN, CIVITAI_API_KEY), not here")
    hints = get_type_hints(SCHEMAS[kind], include_extras=True)
    unknown = set(entry) - set(hints)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {sorted(unknown)} for kind {kind!r} "
                         f"(known: {sorted(hints)})")
    for key, value in entry.items():
        if not _valid(value, hints[key]):
            raise ValueError(f"{where}: {key} must be {_type_name(hints[key])}, not {value!r}")
    return dict(entry)


def read_entries(path: str | os.PathLike) -> list[dict]:
    """The checked ``[[source]]`` entries of ``path`` (every entry, enabled or not)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:  # missing (e.g. deleted since the code location loaded) or unreadable
        raise ValueError(f"{path}: cannot read the sources file: {error.strerror or error}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from None
    unknown = set(data) - {"source"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {sorted(unknown)}: each source is a [[source]] table")
    tables = data.get("source", [])
    if not isinstance(tables, list):
        raise ValueError(f"{path}: 'source' must be an array of tables: write [[source]], not [source]")
    entries, names = [], set()
    for i, table in enumerate(tables):
        label = f" ({table['name']!r})" if isinstance(table, dict) and isinstance(table.get("name"), str) else ""
        where = f"{path}: [[source]] #{i + 1}{label}"
        entry = check_entry(table, where)
        for key in PATH_KEYS:
            if key in entry:
                entry[key] = expand_path(entry[key], f"{where}: {key}")
        entry.setdefault("name", entry["kind"])
        if entry["name"] in names:
            raise ValueError(f"{where}: duplicate source name {entry['name']!r}")
        names.add(entry["name"])
        entries.append(entry)
    civitai = sorted(e["name"] for e in entries if e["kind"] == "civitai")
    for i, entry in enumerate(entries):
        if entry.get("enrich") is not None and entry["enrich"] not in civitai:
            raise ValueError(f"{path}: [[source]] #{i + 1} ({entry['name']!r}): enrich must name a civitai source "
                             f"of this file (it has {civitai}), not {entry['enrich']!r}")
    return entries


def expand_path(value: str, where: str) -> str:
    """``value`` with ``~`` and ``$VARS`` / ``${VARS}`` expanded; a variable that is not set is a
    ``ValueError`` starting with ``where`` and naming it."""
    unset = [a or b for a, b in re.findall(r"\$(?:(\w+)|\{([^}]*)\})", value) if (a or b) not in os.environ]
    if unset:
        raise ValueError(f"{where}: ${unset[0]} is not set (in {value!r})")
    return os.path.expanduser(os.path.expandvars(value))


def load_sources(path: str | os.PathLike, *, include_disabled: bool = False) -> list[Source]:
    """The sources configured in ``path`` (enabled ones unless ``include_disabled``); any error
    in the file raises ``ValueError`` naming it. Relative local folders are relative to the file."""
    entries = read_entries(path)
    by_name = {e["name"]: e for e in entries}
    sources = []
    for entry in entries:
        if entry.get("enabled", True) or include_disabled:
            enricher = _build(by_name[entry["enrich"]], path) if entry.get("enrich") else None
            sources.append(_build(entry, path, enricher))
    return sources


def _build(entry: dict, path: str | os.PathLike, enricher: Source | None = None) -> Source:
    """The source of one checked entry."""
    options = {k: v for k, v in entry.items() if k not in ("kind", "enabled", "enrich")}
    if entry["kind"] == "local":
        options["folder"] = Path(path).parent / Path(options.get("folder", DEMO_LORAS)).expanduser()
        options["enricher"] = enricher
    for key in ("base_models", "types"):
        if key in options:
            options[key] = tuple(options[key])
    return _classes()[entry["kind"]](**options)


def configured_source(path: str | os.PathLike, name: str) -> Source:
    """The enabled source ``name`` of ``path`` (read again each time: edits apply); ``ValueError``
    naming the enabled ones where there is none of that name."""
    sources = {s.name: s for s in load_sources(path)}
    if name not in sources:
        raise ValueError(f"{path} has no enabled source named {name!r} (it has {sorted(sources)})")
    return sources[name]
