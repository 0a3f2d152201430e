"""``autolora sync``: pull what is new in the sources of ``sources.toml`` into a registry, as the
Dagster source sensors do, with each source's cursor kept in the registry (``REGISTRY/sync/``): a
cursor says what *that* registry has seen, so another registry synced from the same sources and
download folder still gets everything (downloads already there are not fetched again).

Cursors the CLI kept before, per source only (``DOWNLOAD_DIR/SOURCE.cursor.json``), are ignored:
they may describe another registry. The first sync after that lists each source in full once;
files already ingested cost a stat, releases already downloaded are not fetched again."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipelines.cli import DEFAULT_REGISTRY, OFFLINE_BY_USER, UsageError, _expanded, _open_registry, _print_json, _table
from pipelines.sources.cursors import cursor_path, load_cursor, save_cursor


def failure_line(name: str, failure: dict, sources_file: str | os.PathLike) -> str:
    """One line for one failure of source ``name``'s sync: the listing (``key`` is the source's
    name) or one release (``key`` is ``SOURCE:ID@REVISION``)."""
    code, reason = failure["code"], failure["reason"]
    if failure["key"] == name and not failure["file"]:
        if code == "missing":
            return f"{name}: {reason}; create it, or set this source's folder in {sources_file}"
        return f"{name}: listing failed: {code}: {reason} (retried next sync)"
    file = f" {failure['file']}" if failure["file"] else ""
    return f"{failure['key']}{file}: {code}: {reason}" + (" (retried next sync)" if failure.get("retry") else "")


def _online() -> None:
    """Let huggingface_hub download: `sync` is an explicit download, so the CLI's offline default
    does not apply to it (an HF_HUB_OFFLINE the user set does)."""
    if OFFLINE_BY_USER:
        return
    os.environ["HF_HUB_OFFLINE"] = "0"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # imported already: it read the variable once, at import
        constants.HF_HUB_OFFLINE = False


def cmd_sync(args: argparse.Namespace) -> int:
    _online()
    from pipelines.sources.config import DOWNLOAD_DIR, SOURCES_FILE, configured_source, load_sources
    from pipelines.sources.sync import SyncReport, sync
    from registry import RegistryNotWritable

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
        path = cursor_path(registry.root, name)
        cursor = None if args.from_start else load_cursor(path)
        try:
            report = sync(sources[name], registry, args.download_dir, cursor)
        except RegistryNotWritable as error:
            raise UsageError(str(error)) from None
        except Exception as error:  # noqa: BLE001  one source's unforeseen failure must not stop the others
            report = SyncReport(cursor=cursor or {})
            report.failed.append({"key": name, "file": "", "code": "internal_error", "retry": True,
                                  "reason": f"internal error (please report): {type(error).__name__}: {error}"})
        save_cursor(path, report.cursor)
        results[name] = report
    if any(r.ingest for r in results.values()):
        registry.maintain()
    status = 1 if any(r.failed for r in results.values()) else 0  # rejected files are no failure
    if args.json:
        _print_json({name: report.to_dict() for name, report in results.items()})
        return status
    for name, report in results.items():
        for failure in report.failed:
            print(f"warning: {failure_line(name, failure, args.sources)}", file=sys.stderr)
        for warning in report.warnings:  # renders not fetched; links, FIFOs, folders a local source skipped
            print(f"warning: {name}: {warning}", file=sys.stderr)
    rows = []
    for name, r in results.items():
        added, rejected = (len(r.ingest.added), len(r.ingest.rejected)) if r.ingest else (0, 0)
        rows.append((name, r.discovered, len(r.downloaded), len(r.already_present), len(r.failed), added, rejected))
    _table("sources synced", ["source", "discovered", "downloaded", "already present", "failed", "added", "rejected"],
           rows)
    return status


def add_commands(sub) -> None:
    """Register ``sync`` on the top-level subparsers."""
    cmd = sub.add_parser(
        "sync", help="pull what is new in the sources of sources.toml into a registry",
        description="Pull what is new in each source since this registry's last sync (its cursor per source is "
                    "kept in REGISTRY/sync/) into the registry. Files rejected for a reason that can change "
                    "without the file changing (unknown_base: register the base; unreadable) are tried again "
                    "by the next sync. Exit status: 0 when every source synced (whatever the ingest "
                    "rejected); 1 when any source failed (a missing local folder, a failed listing or "
                    "download: one warning line each; the other sources are still synced); 2 for a usage "
                    "error.")
    cmd.add_argument("names", nargs="*", help="sources to sync (default: every enabled one)")
    cmd.add_argument("--registry", default=DEFAULT_REGISTRY, type=_expanded)
    cmd.add_argument("--sources", type=_expanded, help="the sources file (default: $AUTOLORA_SOURCES or sources.toml)")
    # defaults resolved in cmd_sync: importing pipelines.sources while parsing would import lancedb and torch
    cmd.add_argument("--download-dir", type=_expanded,
                     help="where remote sources download to, shared by registries (default: $AUTOLORA_DOWNLOAD_DIR "
                          "or .autolora/downloads)")
    cmd.add_argument("--from-start", action="store_true", help="ignore this registry's kept cursors (files "
                                                                "already ingested stay deduplicated; every "
                                                                "rejected file is tried again)")
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(func=cmd_sync)
