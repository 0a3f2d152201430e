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
    name) or one release (``key`` is ``SOURCE:ID@REVISION``), saying what happens to it next."""
    from pipelines.sources.sync import failure_note

    code, reason = failure["code"], failure["reason"]
    if failure["key"] == name and not failure["file"]:
        if code == "missing":
            return f"{name}: {reason}; create it, or set this source's folder in {sources_file}"
        return f"{name}: listing failed: {code}: {reason} (retried next sync)"
    file = f" {failure['file']}" if failure["file"] else ""
    return f"{failure['key']}{file}: {code}: {reason} ({failure_note(failure, 'autolora sync --from-start')})"


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
    return _sync(args)  # Ctrl-C: pipelines.cli.main's one line, exit 130 (a rerun resumes partial downloads)


def _chosen(args: argparse.Namespace) -> list:
    """The sources to sync: those named, else every enabled one; none is a usage error."""
    from pipelines.sources.config import configured_source, load_sources, read_entries

    if not Path(args.sources).is_file():
        raise UsageError(f"no such sources file: {args.sources}")
    try:
        chosen = [configured_source(args.sources, n) for n in args.names] or load_sources(args.sources)
        entries = [] if chosen else read_entries(args.sources)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not chosen:
        if not entries:
            raise UsageError(f"{args.sources} has no sources: add a [[source]] table (kind, name, ...)")
        raise UsageError(f"{args.sources} has no enabled source (disabled: {', '.join(e['name'] for e in entries)}); "
                         "set enabled = true on one, or name it")
    return chosen


def _sync(args: argparse.Namespace) -> int:
    from pipelines.sources.config import DOWNLOAD_DIR, SOURCES_FILE
    from pipelines.sources.lock import sync_lock
    from pipelines.sources.sync import SyncReport, sync
    from registry import RegistryNotWritable

    args.sources, args.download_dir = args.sources or SOURCES_FILE, args.download_dir or DOWNLOAD_DIR
    sources = {s.name: s for s in _chosen(args)}
    registry = _open_registry(args.registry)
    results = {}
    for name, source in sources.items():
        path = cursor_path(registry.root, name)
        with sync_lock(source, args.download_dir, _say):  # from reading the cursor to writing it back
            cursor = load_cursor(path)
            try:
                report = sync(source, registry, args.download_dir, cursor, from_start=args.from_start)
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
    _print_warnings(results, args.sources)
    rows = []
    for name, r in results.items():
        added, rejected = (len(r.ingest.added), len(r.ingest.rejected)) if r.ingest else (0, 0)
        rows.append((name, r.discovered, len(r.downloaded), len(r.already_present), len(r.refreshed), len(r.failed),
                     added, rejected))
    _table("sources synced", ["source", "discovered", "downloaded", "already present", "cards refreshed", "failed",
                              "added", "rejected"], rows)
    return status


def _say(line: str) -> None:
    print(f"autolora sync: {line}", file=sys.stderr)


def _print_warnings(results: dict, sources_file: str) -> None:
    for name, report in results.items():
        for failure in report.failed:
            print(f"warning: {failure_line(name, failure, sources_file)}", file=sys.stderr)
        if report.gone_upstream:
            shown = ", ".join(report.gone_upstream[:5]) + (", ..." if len(report.gone_upstream) > 5 else "")
            print(f"warning: {name}: {len(report.gone_upstream)} downloaded release(s) no longer listed upstream "
                  f"(deleted there?), kept here: {shown}", file=sys.stderr)
        for warning in report.warnings:  # renders not fetched; links, FIFOs, folders a local source skipped
            print(f"warning: {name}: {warning}", file=sys.stderr)


def add_commands(sub) -> None:
    """Register ``sync`` on the top-level subparsers."""
    cmd = sub.add_parser(
        "sync", help="pull what is new in the sources of sources.toml into a registry",
        description="Pull what is new in each source since this registry's last sync (its cursor per source is "
                    "kept in REGISTRY/sync/) into the registry. Files rejected for a reason that can change "
                    "without the file changing (unknown_base: register the base; unreadable) are tried again "
                    "by the next sync. A download that failed for a reason that can pass (network, 5xx, 429, "
                    "401/403) is retried by every sync; one that cannot (sha256 or size mismatch, too large, "
                    "vanished) is kept in the cursor and retried by --from-start (too large: also once "
                    "max_file_bytes changes). A second sync of the same source waits for the first. Exit "
                    "status: 0 when every source synced (whatever the ingest rejected); 1 when any source "
                    "failed (a missing local folder, a failed listing or download: one warning line each; "
                    "the other sources are still synced); 2 for a usage error (also: no enabled source); "
                    "130 when interrupted (rerun to resume).")
    cmd.add_argument("names", nargs="*", help="sources to sync (default: every enabled one)")
    cmd.add_argument("--registry", default=DEFAULT_REGISTRY, type=_expanded)
    cmd.add_argument("--sources", type=_expanded, help="the sources file (default: $AUTOLORA_SOURCES or sources.toml)")
    # defaults resolved in cmd_sync: importing pipelines.sources while parsing would import lancedb and torch
    cmd.add_argument("--download-dir", type=_expanded,
                     help="where remote sources download to, shared by registries (default: $AUTOLORA_DOWNLOAD_DIR "
                          "or .autolora/downloads)")
    cmd.add_argument("--from-start", action="store_true",
                     help="list each source in full, ignoring where this registry's cursor says it stopped: releases "
                          "downloaded before are not fetched again, but their cards are rewritten where upstream "
                          "changed them; failures kept as not retryable (sha256 or size mismatch, too large, "
                          "vanished) are tried again; every rejected file is tried again")
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(func=cmd_sync)
