"""``autolora sync``: pull what is new in the sources of ``sources.toml`` into a registry, as the
Dagster source sensors do, with each source's cursor kept beside its downloads."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipelines.cli import DEFAULT_REGISTRY, UsageError, _expanded, _open_registry, _print_json, _table
from registry.atomic_write import write_atomically


def cursor_path(download_dir: str | os.PathLike, source: str) -> Path:
    """Where the CLI keeps ``source``'s cursor: ``DOWNLOAD_DIR/SOURCE.cursor.json``."""
    from pipelines.sources.base import safe_name

    return Path(download_dir) / f"{safe_name(source)}.cursor.json"


def _save_cursor(path: Path, cursor: dict) -> None:
    """Written whole or not at all (a crash mid-write keeps the previous cursor)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(cursor))


def cmd_sync(args: argparse.Namespace) -> int:
    from pipelines.sources.config import DOWNLOAD_DIR, SOURCES_FILE, configured_source, load_sources
    from pipelines.sources.sync import sync

    args.sources, args.download_dir = args.sources or SOURCES_FILE, args.download_dir or DOWNLOAD_DIR
    if not Path(args.sources).is_file():
        raise UsageError(f"no such sources file: {args.sources}")
    try:
        chosen = [configured_source(args.sources, n) for n in args.names] or load_sources(args.sources)
    except ValueError as error:
        raise UsageError(str(error)) from None
    sources = {s.name: s for s in chosen}
    registry = _open_registry(args.registry)
    results = {}
    for name in sources:
        path = cursor_path(args.download_dir, name)
        cursor = None if args.from_start or not path.is_file() else json.loads(path.read_text(encoding="utf-8"))
        report = sync(sources[name], registry, args.download_dir, cursor)
        _save_cursor(path, report.cursor)
        results[name] = report
    if any(r.ingest for r in results.values()):
        registry.maintain()
    if args.json:
        _print_json({name: report.to_dict() for name, report in results.items()})
        return 0
    for name, report in results.items():
        for failure in report.failed:
            print(f"warning: {name}: {failure['key']} {failure['file']}: {failure['code']}: {failure['reason']}",
                  file=sys.stderr)
    rows = []
    for name, r in results.items():
        added, rejected = (len(r.ingest.added), len(r.ingest.rejected)) if r.ingest else (0, 0)
        rows.append((name, r.discovered, len(r.downloaded), len(r.already_present), len(r.failed), added, rejected))
    _table("sources synced", ["source", "discovered", "downloaded", "already present", "failed", "added", "rejected"],
           rows)
    return 0


def add_commands(sub) -> None:
    """Register ``sync`` on the top-level subparsers."""
    cmd = sub.add_parser("sync", help="pull what is new in the sources of sources.toml into a registry")
    cmd.add_argument("names", nargs="*", help="sources to sync (default: every enabled one)")
    cmd.add_argument("--registry", default=DEFAULT_REGISTRY, type=_expanded)
    cmd.add_argument("--sources", type=_expanded, help="the sources file (default: $AUTOLORA_SOURCES or sources.toml)")
    # defaults resolved in cmd_sync: importing pipelines.sources while parsing would import lancedb and torch
    cmd.add_argument("--download-dir", type=_expanded,
                     help="downloads and each source's cursor (default: $AUTOLORA_DOWNLOAD_DIR or .autolora/downloads)")
    cmd.add_argument("--from-start", action="store_true", help="ignore the kept cursor (files already ingested "
                                                                "stay deduplicated)")
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(func=cmd_sync)
