"""The ``autolora`` command line. ``--json`` prints only JSON on stdout."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Sequence

OFFLINE_BY_USER = "HF_HUB_OFFLINE" in os.environ  # else the CLI's default: `sync`, which downloads, lifts it
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched implicitly
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_REGISTRY = os.environ.get("AUTOLORA_REGISTRY", ".autolora/registry")
USAGE_ERROR = 2  # argparse's exit status for a bad command line


class UsageError(Exception):
    """A command line that names something that is not there: exit 2 with the message."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``autolora search: argument -k: ...``), still exit 2."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _quiet() -> None:
    """No third-party chatter on stderr (library warnings, weight-loading bars, lance logs)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "LANCEDB_LOG"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger().setLevel(logging.ERROR)


def _open_registry(path: str, **kwargs):
    """The registry at ``path``; a folder holding none is a usage error for reading commands."""
    from registry import Registry, RegistryNotFound

    try:
        return Registry.open(path, **kwargs)
    except RegistryNotFound as error:
        raise UsageError(str(error)) from None


def _print_json(value) -> None:
    sys.stdout.write(json.dumps(value, indent=None, default=str) + "\n")


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")  # a narrow or piped terminal wraps ids, never cuts them
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    Console().print(table)


def cmd_inspect(args: argparse.Namespace) -> int:
    from registry.ingest.read_lease import read_lease
    from registry.lora.errors import RejectedFile
    from registry.lora.inspect import inspect_file
    from registry.lora.metadata import from_sidecars
    from registry.store.store import user_path

    path = user_path(args.file)
    if not os.path.lexists(path):
        raise UsageError(f"no such file: {path}")
    bases = _open_registry(args.registry, create=False).bases() if args.registry else _default_bases()
    try:  # the base named by a card or .civitai.info beside the file counts, as at ingest; read under a
        with read_lease(path):  # lease, as at ingest (a file rewritten in place waits: no SIGBUS)
            summary = inspect_file(path, bases, base_hint=from_sidecars(path).base_model_hint).summary()
    except (RejectedFile, OSError) as error:
        code, reason = ((error.code, error.reason) if isinstance(error, RejectedFile)
                        else ("unreadable", f"unreadable: {error.strerror or error}"))
        result = {"rejected": True, "reason": reason, "code": code}
        _print_json(result) if args.json else print(f"rejected ({code}): {reason}")
        return 1
    if args.json:
        _print_json(summary)
    else:
        _table(str(args.file), ["field", "value"],
               [(k, "; ".join(v) or "none" if k == "notes" else v) for k, v in summary.items()])
    return 0


def _default_bases():
    """The bases of the default registry ($AUTOLORA_REGISTRY or .autolora/registry) if it holds one, else built-ins."""
    from registry import Registry, RegistryNotFound
    from registry.lora.base_models import builtin_bases

    try:
        return Registry.open(DEFAULT_REGISTRY, create=False).bases()
    except RegistryNotFound:
        return builtin_bases()


def cmd_ingest(args: argparse.Namespace) -> int:
    from registry.store.store import user_path

    missing = [p for p in args.paths if not os.path.lexists(user_path(p))]
    if missing:  # checked before the registry is opened, so nothing is created
        raise UsageError(f"no such file or folder: {', '.join(missing)}")
    from registry import RegistryNotWritable

    registry = _open_registry(args.registry)
    try:
        report = registry.add(args.paths, progress=not args.json and sys.stderr.isatty(),
                              batch_size=args.batch_size)
    except (FileNotFoundError, RegistryNotWritable) as error:
        raise UsageError(str(error)) from None
    maintenance = registry.maintain()
    if args.json:
        _print_json({**report.to_dict(), "maintenance": maintenance.to_dict()})
        return 0
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if report.added:
        _table("added", ["lora_id", "path"], [(r["lora_id"], r["path"]) for r in report.added])
    if report.duplicates:
        _table("duplicates", ["path", "lora_id", "kind"],
               [(r["path"], r["lora_id"], r["kind"]) for r in report.duplicates])
    if report.rejected:
        _table("rejected", ["path", "reason"], [(r["path"], r["reason"]) for r in report.rejected])
    if report.refreshed:
        _table("metadata refreshed from new sidecars", ["path", "lora_id"],
               [(r["path"], r["lora_id"]) for r in report.refreshed])
    print(f"{len(report.added)} added, {len(report.duplicates)} duplicates, "
          f"{len(report.refreshed)} refreshed, {len(report.unchanged)} unchanged, "
          f"{len(report.rejected)} rejected; registry holds {len(registry)} LoRAs")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    registry = _open_registry(args.registry, version=args.version, create=False)
    try:
        hits = registry.search(args.prompt, k=args.k, channel=args.channel, base_model=args.base_model,
                               where=args.where, include_removed=args.include_removed)
    except (ValueError, LookupError) as error:  # a malformed --where filter; no weight encoder yet
        raise UsageError(f"search failed: {error}") from None
    except FileNotFoundError as error:  # the active encoder's text model cannot be loaded here
        from models.text_encoder import TextEncoderNotFound

        if not isinstance(error, TextEncoderNotFound):
            raise
        raise UsageError(f"search failed: {error}") from None
    if args.json:
        _print_json([hit.to_dict() for hit in hits])
    else:
        _table(f"top {args.k} for {args.prompt!r}", ["lora_id", "name", "score", "base_model", "trigger words"],
               [(h.lora_id, h.name, f"{h.score:.4f}", h.base_model, ", ".join(h.trigger_words)) for h in hits])
        if not hits:
            print("no LoRA matches" + (" (the registry is empty)" if len(registry) == 0 else ""))
    return 0


def cmd_maintain(args: argparse.Namespace) -> int:
    report = _open_registry(args.registry, create=False).maintain(collect_blobs=True)
    _print_json(report.to_dict()) if args.json else _table(
        "maintenance", ["field", "value"], list(report.to_dict().items()))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    counts = _open_registry(args.registry, create=False).prune()
    _print_json(counts) if args.json else print(
        f"{counts['removed']} LoRAs marked removed (every known path gone), {counts['restored']} "
        f"restored; {counts['paths_gone']} paths gone, {counts['paths_back']} back")
    return 0


def cmd_world_build(args: argparse.Namespace) -> int:
    from pipelines.world.build import build_world

    result = build_world(args.out, size=args.size, seed=args.seed, progress=not args.json)
    _print_json(result) if args.json else _table("demo world", ["field", "value"], list(result.items()))
    return 0


def cmd_world_eval(args: argparse.Namespace) -> int:
    from pipelines.world.evaluate import evaluate_world

    report = evaluate_world(args.world, n_base=args.base_prompts, n_lora=args.lora_prompts, seed=args.seed,
                            progress=not args.json)
    if args.json:
        _print_json(report)
        return 0
    base, loras = report["base"], report["loras"]
    _table("base prompt-following (read-out accuracy)", ["attribute", "accuracy", "chance"],
           [(a, f"{acc:.3f}", f"{base['chance'][a]:.3f}") for a, acc in base["accuracy"].items()])
    _table(f"zoo LoRAs ({loras['count']}): theme read-out accuracy", ["", "value"],
           [("with LoRA", f"{loras['with_lora']:.3f}"), ("without LoRA", f"{loras['without_lora']:.3f}"),
            ("gain", f"{loras['gain']:.3f}")])
    _table("theme read-out accuracy by split, coverage and rank", ["group", "LoRAs", "with LoRA", "without"],
           [(f"{key[3:]} {name}", g["count"], f"{g['with_lora']:.3f}", f"{g['without_lora']:.3f}")
            for key in ("by_split", "by_coverage", "by_rank") for name, g in loras[key].items()])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    result = run_demo(args.workdir, size=args.size, seed=args.seed, folders=args.folders, progress=not args.json)
    registry, report = result.registry, result.ingest
    if args.json:
        encoder = {k: v for k, v in (result.encoder or {}).items() if k not in ("losses", "pool")}
        _print_json({"ingest": report.to_dict(), "registry": str(registry.root), "encoder": encoder or None,
                     "gates": result.gates, "fusion_grid": str(result.fusion_grid) if result.fusion_grid else None,
                     "captions": result.captions,
                     "searches": {p: {c: [h.to_dict() for h in hits] for c, hits in by_channel.items()}
                                  for p, by_channel in result.searches.items()}})
        return 0
    print(f"{len(report.added)} added, {len(report.duplicates)} duplicates, {len(report.rejected)} rejected; "
          f"registry {registry.root} holds {len(registry)} LoRAs")
    for caption in result.captions:
        print(f"captions by {caption['model']}: {caption['captioned']} LoRAs captioned ({caption['images']} renders, "
              f"{len(caption['self_rendered'])} self-rendered), {caption['up_to_date']} up to date")
    if result.encoder:
        verb = "trained" if result.encoder["trained"] else "cached (training pool unchanged)"
        print(f"LoRA-weight encoder {result.encoder['version']}: {verb}, pool of {result.encoder['pool_size']}")
    for prompt, by_channel in result.searches.items():
        channels = list(by_channel)
        depth = max(len(hits) for hits in by_channel.values())
        rows = [(rank + 1, *(_shown(by_channel[c], rank) for c in channels)) for rank in range(depth)]
        _table(f"search: {prompt!r}", ["#", *channels], rows)
    if result.fusion_grid:
        gates = result.gates
        print(f"fusion gates {gates['version']}: {'cached' if gates['cached'] else 'trained'}; "
              f"{gates['prompt']!r} with {', '.join(gates['loras'])} by {', '.join(gates['methods'])} "
              f"(one row each): {result.fusion_grid}")
    return 0


def _shown(hits, rank: int) -> str:
    return f"{hits[rank].name} ({hits[rank].score:.2f})" if rank < len(hits) else ""


def _expanded(text: str) -> str:
    """A path argument with ``~`` and ``$VARS`` expanded (every path a user gives)."""
    return os.path.expandvars(os.path.expanduser(text))


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes on the command line arrive as surrogates
        return False


def _report_folder(path: str) -> str:
    """``path`` checked as a report folder before any work: an existing folder this process can write
    in, or a missing one under such a folder (created by the report); else a usage error."""
    from pathlib import Path

    from registry.atomic_write import cannot_create_in

    nearest = Path(path).absolute()
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise UsageError(f"--out {path}: {nearest} is a file, not a folder")
    why = cannot_create_in(nearest)
    if why:
        raise UsageError(f"--out {path}: cannot write in {nearest} ({why})")
    return path


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autolora", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show library warnings and progress on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    inspect = sub.add_parser("inspect", help="validate and describe one LoRA file")
    inspect.add_argument("file")
    inspect.add_argument("--registry", type=_expanded, help="also match against this registry's base models "
                         "(default: $AUTOLORA_REGISTRY or .autolora/registry, if it holds a registry)")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)

    ingest = sub.add_parser("ingest", help="ingest LoRA files and folders into a registry")
    ingest.add_argument("paths", nargs="+", type=_expanded)
    ingest.add_argument("--registry", default=DEFAULT_REGISTRY, type=_expanded)
    ingest.add_argument("--batch-size", type=int, default=64, help="files per registry write")
    ingest.add_argument("--json", action="store_true")
    ingest.set_defaults(func=cmd_ingest)

    search = sub.add_parser("search", help="find the LoRAs that fit a prompt")
    search.add_argument("prompt")
    search.add_argument("--registry", default=DEFAULT_REGISTRY, type=_expanded)
    search.add_argument("-k", type=_positive, default=5, help="how many LoRAs (at least 1)")
    search.add_argument("--base-model")
    search.add_argument("--channel", choices=["hybrid", "weights", "text"], default="hybrid",
                        help="weights: the LoRA-weight encoder alone; text: names, triggers, prompts, "
                             "captions (full text and text vector); hybrid: all three fused (default)")
    search.add_argument("--where", help="a LanceDB SQL filter, e.g. \"rank >= 8\"")
    search.add_argument("--version", help="search a tagged or numbered version (read-only)")
    search.add_argument("--include-removed", action="store_true",
                        help="also LoRAs whose every known file is gone (see prune)")
    search.add_argument("--json", action="store_true")
    search.set_defaults(func=cmd_search)

    maintain = sub.add_parser("maintain", help="refresh the indexes, compact the tables, remove orphan blobs")
    maintain.add_argument("--registry", default=DEFAULT_REGISTRY, type=_expanded)
    maintain.add_argument("--json", action="store_true")
    maintain.set_defaults(func=cmd_maintain)

    prune = sub.add_parser("prune", help="mark LoRAs whose every known file is gone as removed")
    prune.add_argument("--registry", default=DEFAULT_REGISTRY, type=_expanded)
    prune.add_argument("--json", action="store_true")
    prune.set_defaults(func=cmd_prune)

    world = sub.add_parser("world", help="the demo world").add_subparsers(dest="world_command", required=True)
    world_build = world.add_parser("build", help="build (or reuse) the demo world")
    world_build.add_argument("--size", choices=["micro", "default"], default="default")
    world_build.add_argument("--out", default=".autolora/world", type=_expanded)
    world_build.add_argument("--seed", type=int, default=0)
    world_build.add_argument("--json", action="store_true")
    world_build.set_defaults(func=cmd_world_build)

    world_eval = world.add_parser("eval", help="measure a built world: base prompt-following, LoRA themes")
    world_eval.add_argument("--world", default=".autolora/world", type=_expanded,
                            help="a built world folder (or the --out folder holding one)")
    world_eval.add_argument("--base-prompts", type=int, default=192)
    world_eval.add_argument("--lora-prompts", type=int, default=8)
    world_eval.add_argument("--seed", type=int, default=0)
    world_eval.add_argument("--json", action="store_true")
    world_eval.set_defaults(func=cmd_world_eval)

    demo = sub.add_parser("demo", help="the main job: build the demo world if missing, ingest, search")
    demo.add_argument("folders", nargs="*", type=_expanded, help="ingest these instead of the demo world")
    demo.add_argument("--workdir", default=".autolora", type=_expanded)
    demo.add_argument("--size", choices=["micro", "default"], default="default")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=cmd_demo)

    from pipelines import cli_bases, cli_captions, cli_generate, cli_retrieval, cli_show, cli_sources

    evaluate = sub.add_parser("eval", help="evaluations on held-out LoRAs").add_subparsers(dest="what", required=True)
    train = sub.add_parser("train", help="train a model on the registry").add_subparsers(dest="what", required=True)
    cli_retrieval.add_commands(sub, train, evaluate)
    cli_generate.add_commands(sub, evaluate, train)
    cli_sources.add_commands(sub)
    cli_captions.add_commands(sub)
    cli_bases.add_commands(sub)
    cli_show.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet()
    try:
        if isinstance(getattr(args, "prompt", None), str) and not _utf8(args.prompt):
            raise UsageError("the prompt is not valid UTF-8 (check the terminal's encoding)")
        return int(args.func(args) or 0)
    except UsageError as error:
        print(f"autolora {args.command}: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback (registry writes are atomic: a rerun goes on)
        print(f"autolora {args.command}: interrupted; run it again to go on", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `autolora search ... | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:  # exit without a last collection over lancedb's import-time objects (~0.2 s)
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
