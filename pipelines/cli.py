"""The ``autolora`` command line. ``--json`` prints only JSON on stdout."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched implicitly
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_REGISTRY = os.environ.get("AUTOLORA_REGISTRY", ".autolora/registry")


def _print_json(value) -> None:
    sys.stdout.write(json.dumps(value, indent=None, default=str) + "\n")


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    Console().print(table)


def cmd_inspect(args: argparse.Namespace) -> int:
    from registry.errors import RejectedFile
    from registry.inspect import inspect_file
    from registry.store import Registry

    bases = Registry.open(args.registry).bases() if args.registry else None
    if bases is None:
        from registry.base_models import flux1_dev

        bases = [flux1_dev()]
    try:
        summary = inspect_file(args.file, bases).summary()
    except RejectedFile as rejection:
        result = {"rejected": True, "reason": rejection.reason, "code": rejection.code}
        _print_json(result) if args.json else print(f"rejected ({rejection.code}): {rejection.reason}")
        return 1
    if args.json:
        _print_json(summary)
    else:
        _table(str(args.file), ["field", "value"], list(summary.items()))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from registry.store import Registry

    registry = Registry.open(args.registry)
    report = registry.add(args.paths, progress=not args.json and sys.stderr.isatty(),
                          batch_size=args.batch_size)
    if args.json:
        _print_json(report.to_dict())
        return 0
    _table("added", ["lora_id", "path"], [(r["lora_id"], r["path"]) for r in report.added])
    if report.duplicates:
        _table("duplicates", ["path", "lora_id", "kind"],
               [(r["path"], r["lora_id"], r["kind"]) for r in report.duplicates])
    if report.rejected:
        _table("rejected", ["path", "reason"], [(r["path"], r["reason"]) for r in report.rejected])
    print(f"{len(report.added)} added, {len(report.duplicates)} duplicates, "
          f"{len(report.rejected)} rejected; registry holds {len(registry)} LoRAs")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from registry.store import Registry

    hits = Registry.open(args.registry).search(args.prompt, k=args.k, base_model=args.base_model,
                                               mode=args.mode)
    if args.json:
        _print_json([hit.to_dict() for hit in hits])
    else:
        _table(f"top {args.k} for {args.prompt!r}", ["lora_id", "name", "score", "base_model", "trigger words"],
               [(h.lora_id, h.name, f"{h.score:.4f}", h.base_model, ", ".join(h.trigger_words)) for h in hits])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autolora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    inspect = sub.add_parser("inspect", help="validate and describe one LoRA file")
    inspect.add_argument("file")
    inspect.add_argument("--registry", help="also match against this registry's base models")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)

    ingest = sub.add_parser("ingest", help="ingest LoRA files and folders into a registry")
    ingest.add_argument("paths", nargs="+")
    ingest.add_argument("--registry", default=DEFAULT_REGISTRY)
    ingest.add_argument("--batch-size", type=int, default=64, help="files per registry write")
    ingest.add_argument("--json", action="store_true")
    ingest.set_defaults(func=cmd_ingest)

    search = sub.add_parser("search", help="find the LoRAs that fit a prompt")
    search.add_argument("prompt")
    search.add_argument("--registry", default=DEFAULT_REGISTRY)
    search.add_argument("-k", type=int, default=5)
    search.add_argument("--base-model")
    search.add_argument("--mode", choices=["hybrid", "text", "vector"], default="hybrid")
    search.add_argument("--json", action="store_true")
    search.set_defaults(func=cmd_search)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
