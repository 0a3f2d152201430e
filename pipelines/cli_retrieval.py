"""``autolora train encoder``, ``autolora embed`` and ``autolora eval retrieval``."""

from __future__ import annotations

import argparse
import sys

from pipelines.cli import DEFAULT_REGISTRY, UsageError, _expanded, _open_registry, _print_json, _report_folder, _table


def cmd_train_encoder(args: argparse.Namespace) -> int:
    from models.text_encoder import TextEncoderNotFound
    from pipelines.encoder_pool import Recipe, train_registry_encoder
    from pipelines.generate import BaseNotFound

    registry = _open_registry(args.registry, create=False)
    base = args.base_model or _only_base(registry)
    recipe = Recipe(design=args.design, steps=args.steps, seed=args.seed, probes_from=args.probes_from or "",
                    text_encoder=args.text_encoder or "")
    try:
        info = train_registry_encoder(registry, base, args.where, recipe, activate=not args.no_activate,
                                      progress=not args.json)
    except BaseNotFound as error:  # --probes-from names no pipeline
        raise UsageError(f"--probes-from: {error}") from None
    except TextEncoderNotFound as error:  # --text-encoder (or the --probes-from pipeline's CLIP) does not load
        raise UsageError(f"--text-encoder: {error}") from None
    except (ValueError, KeyError) as error:
        raise UsageError(str(error)) from None
    info.pop("losses", None)
    if args.json:
        _print_json(info)
    else:
        verb = "trained" if info["trained"] else "already trained (pool unchanged)"
        print(f"encoder {info['version']} {verb} on {info['pool_size']} LoRAs of {base}; "
              f"embedded {info['embedding']['embedded']}")
    return 0


def _only_base(registry) -> str:
    """The base model of every LoRA in the registry, when there is exactly one."""
    bases = sorted({row["base_model"] for row in registry.column_rows(registry.loras, ["base_model"])})
    if len(bases) != 1:
        raise UsageError(f"the registry holds LoRAs of {len(bases)} base models ({', '.join(bases)}): "
                         "name one with --base-model")
    return bases[0]


def cmd_embed(args: argparse.Namespace) -> int:
    registry = _open_registry(args.registry, create=False)
    if args.text:
        text = registry.refresh_text_vectors(progress=not args.json and sys.stderr.isatty())
        _print_json(text.to_dict()) if args.json else print(
            f"text vectors of {text.rows} LoRAs made again: {text.changed} changed, "
            f"{text.without_vector} without one (their texts name nothing)")
        return 0
    report = registry.refresh_embeddings()
    _print_json(report.to_dict()) if args.json else print(f"embedded {report.embedded}; failed {len(report.failed)}")
    return 0


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from pipelines.evaluate.retrieval import NotEvaluable, evaluate_retrieval

    _open_registry(args.registry, create=False)  # a usage error if missing
    _report_folder(args.out)
    try:
        report = evaluate_retrieval(args.registry, args.world, args.out, baselines_too=not args.no_baselines,
                                    progress=not args.json)
    except (NotEvaluable, FileNotFoundError) as error:  # not a bug's KeyError: that shows its traceback
        raise UsageError(str(error)) from None
    if args.json:
        _print_json(report)
        return 0
    from pipelines.evaluate.retrieval import CHANNELS
    from pipelines.evaluate.retrieval_report import METRICS, ROWS

    rows = [(name, *(f"{report[name][m]:.3f}" for m in METRICS)) for name in ROWS if name in report]
    rows += [(f"stripped {c}", *(f"{report['stripped'][c][m]:.3f}" for m in METRICS)) for c in CHANNELS]
    _table(f"retrieval over {report['pool']} held-out LoRAs, {report['queries']} queries",
           ["row", "R@1", "R@3", "R@10", "MRR"], rows)
    print(f"within-theme cosine {report['within_theme_cos']:.3f}, cross-theme {report['cross_theme_cos']:.3f}; "
          f"report: {args.out}/retrieval.md")
    return 0


def add_commands(sub, train, evaluate) -> None:
    """Register ``embed``, ``train encoder`` and ``eval retrieval`` (``train``, ``evaluate``: the
    ``train`` and ``eval`` subparsers)."""
    encoder = train.add_parser("encoder", help="train the LoRA-weight encoder on the registry's LoRAs, "
                                               "embed every LoRA with it and switch search to it")
    encoder.add_argument("--registry", default=DEFAULT_REGISTRY, type=_expanded)
    encoder.add_argument("--base-model", help="whose LoRAs to train on (default: the only one)")
    encoder.add_argument("--where", help="narrow the training pool (a LanceDB SQL filter)")
    encoder.add_argument("--design", choices=["ours", "paper"], default="ours")
    encoder.add_argument("--steps", type=int, default=300)
    encoder.add_argument("--seed", type=int, default=0)
    encoder.add_argument("--probes-from", type=_expanded, metavar="PIPELINE",
                         help="the base as a diffusers pipeline (folder, Hub id or demo world): probe each "
                              "layer in the directions of the inputs the base really feeds it")
    encoder.add_argument("--text-encoder", metavar="SPEC",
                         help="the frozen text side: 'clip' (the --probes-from pipeline's CLIP text encoder), "
                              "'clip:PIPELINE', or a sentence-transformers path or id (default: the bundled "
                              "all-MiniLM-L6-v2)")
    encoder.add_argument("--no-activate", action="store_true", help="register the version without switching to it")
    encoder.add_argument("--json", action="store_true")
    encoder.set_defaults(func=cmd_train_encoder)

    embed = sub.add_parser("embed", help="embed the LoRAs that lack the active encoder's weight vector "
                                         "(--text: make every LoRA's text vector again)")
    embed.add_argument("--registry", default=DEFAULT_REGISTRY, type=_expanded)
    embed.add_argument("--text", action="store_true",
                       help="make every LoRA's text vector again from its search text with the current text "
                            "recipe (rows written by older versions keep theirs otherwise)")
    embed.add_argument("--json", action="store_true")
    embed.set_defaults(func=cmd_embed)

    retrieval = evaluate.add_parser("retrieval", help="retrieval on the held-out LoRAs: channels, stripped "
                                                      "copy, the authors' design, baselines")
    retrieval.add_argument("--registry", default=DEFAULT_REGISTRY, type=_expanded)
    retrieval.add_argument("--world", default=".autolora/world", type=_expanded)
    retrieval.add_argument("--out", default=".autolora/reports/retrieval", type=_expanded)
    retrieval.add_argument("--no-baselines", action="store_true", help="our channels only (fast)")
    retrieval.add_argument("--json", action="store_true")
    retrieval.set_defaults(func=cmd_eval_retrieval)
