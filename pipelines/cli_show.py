"""``autolora show``: everything the registry holds about one LoRA — its metadata, its renders with
their prompts and captions (and the model that wrote them), every path it was seen at — which
``search`` (a ranked list) does not show."""

from __future__ import annotations

import argparse

from pipelines.cli import DEFAULT_REGISTRY, UsageError, _expanded, _open_registry, _print_json, _table

_SHOWN = ("name", "lora_id", "base_model", "architecture", "format", "rank", "layers", "trigger_words", "tags",
          "description", "licence", "nsfw_level", "source_url", "sha256", "size_bytes", "blob", "added_at", "removed",
          "encoder_version", "caption_model")


def add_commands(sub) -> None:
    """Add ``show`` to the ``autolora`` subcommands ``sub``."""
    show = sub.add_parser("show", help="one LoRA's row: metadata, renders and captions, the paths it was seen at")
    show.add_argument("lora_id", help="its id as search and ingest print it (lora-…), or a unique start of it")
    show.add_argument("--registry", default=DEFAULT_REGISTRY, type=_expanded)
    show.add_argument("--version", help="a tagged or numbered version (read-only)")
    show.add_argument("--json", action="store_true", help="the whole row (header metadata included), without vectors")
    show.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    registry = _open_registry(args.registry, version=args.version, create=False)
    row = _resolve(registry, args.lora_id)
    paths = registry.paths_of(row["lora_id"])
    if args.json:
        _print_json({**row, "paths": paths})
        return 0
    values = [(key, _shown(row.get(key))) for key in _SHOWN if key in row]
    _table(row.get("name") or row["lora_id"], ["field", "value"], values)
    captions = list(row.get("captions") or [])
    renders = [(i, prompt, blob or "(no image)", captions[i] if i < len(captions) else "")
               for i, (prompt, blob) in enumerate(zip(row.get("render_prompts") or [], row.get("render_blobs") or []))]
    if renders:
        _table(f"renders (captions by {row.get('caption_model') or 'no model yet'})",
               ["#", "prompt", "blob", "caption"], renders)
    _table("paths", ["path", "format", "gone"], [(p["path"], p["format"], str(bool(p["gone"]))) for p in paths])
    return 0


def _resolve(registry, wanted: str) -> dict:
    """The row of the LoRA ``wanted`` names: its id, or the start of exactly one id."""
    row = registry.get(wanted)
    if row is not None:
        return row
    ids = [i for i in registry.lora_ids() if i.startswith(wanted)] if wanted else []
    if len(ids) == 1:
        return registry.get(ids[0])
    if ids:
        raise UsageError(f"{wanted!r} starts {len(ids)} LoRA ids ({', '.join(sorted(ids)[:5])}, …): give more of it")
    raise UsageError(f"no LoRA {wanted!r} in {registry.root} (ids are printed by search and ingest)")


def _shown(value: object, limit: int = 300) -> str:
    """A value on a line or three (``--json`` has all of it)."""
    text = ", ".join(map(str, value)) if isinstance(value, list) else "" if value is None else str(value)
    more = f" ({len(value)} in all)" if isinstance(value, list) else ""
    return text if len(text) <= limit else text[:limit - 1] + "…" + more
