"""``autolora generate``, ``autolora train gates``, ``autolora eval fusion`` and ``autolora eval generation``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from pipelines.cli import UsageError, _expanded, _open_registry, _positive, _print_json, _report_folder, _table


def _world_root(path: str) -> Path:
    from pipelines.world.evaluate import resolve_world_root

    try:
        return resolve_world_root(path)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None


def _gates(args: argparse.Namespace, world: Path | None, registry=None, base: str | None = None):
    """--gates FILE, else the world's trained gates (trained now if missing), else the newest gates
    the registry holds for ``base`` (``autolora train gates --registry``), else none."""
    from pipelines.train_gates import load_gates, train_world_gates

    if args.gates:
        if not Path(args.gates).is_file():
            raise UsageError(f"no such gate checkpoint: {args.gates}")
        return load_gates(args.gates)
    if world is not None:
        return train_world_gates(world).gates
    if registry is not None and base is not None:
        from pipelines.generate import resolve_base
        from pipelines.registry_gates import gate_bases, newest_gates

        source = resolve_base(base)
        found = newest_gates(registry, source)
        if found is None:
            others = gate_bases(registry)
            if others:
                print(f"autolora generate: warning: {registry.root / 'gates'} holds gates for other bases only "
                      f"({', '.join(others)}): gates match the base as it was named when trained (Hub id or folder) "
                      "or its transformer's weight files; pass --base that way, or --gates FILE", file=sys.stderr)
            return None
        print(f"using gates {found[0]} ({_gates_origin(found[2], source)}; the newest for this base; "
              "--gates FILE picks others)", file=sys.stderr)
        return load_gates(found[0])
    return None


def _gates_origin(meta: dict, source: str) -> str:
    """What a registry gate checkpoint was trained for, from its header's meta: the base as spelled then (and
    whether it matched by its weights, not by that name), the LoRAs' base model, their count and the device."""
    from pipelines.registry_gates import trained_for

    spelled, base_model = trained_for(meta)
    how = "" if spelled == source else ", matched by its transformer's weights"
    where = f", on {meta['trained_on']}" if meta.get("trained_on") else ""
    return f"trained for {spelled or '?'}{how} on {len(meta.get('pool', []))} LoRAs of {base_model or '?'}{where}"


NO_GATES = ("no gates given: gated fusion runs untrained gates (plain addition); "
            "pass --gates FILE or --world DIR, or train some with 'autolora train gates --registry R --base B'")


def _generator(registry, base, args: argparse.Namespace):
    """The Generator on ``base`` with --steps / --size applied; a base that is not there or a size
    the base cannot render is a usage error."""
    from pipelines.generate import BaseNotFound, Generator

    try:
        gen = Generator(registry, base, method=args.fusion, progress=bool(getattr(args, "verbose", False)),
                        device=args.device, dtype=args.dtype)
    except BaseNotFound as error:
        raise UsageError(str(error)) from None
    try:
        gen.settings = dataclasses.replace(gen.settings, **{
            name: value for name, value in (("steps", args.steps), ("size", args.size)) if value is not None})
    except ValueError as error:
        gen.close()
        raise UsageError(f"--size: {error}") from None
    return gen


def _add_placement(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """--device and --dtype (unset: auto, a GPU if torch sees one, in the weights' stored precision, else
    the cpu in float32)."""
    parser.add_argument("--device", help=f"{prefix}where the base runs: auto (the default: a CUDA or MPS GPU if torch "
                                         "sees one, else cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", help=f"{prefix}its precision: auto (the default: on a GPU the precision the "
                                        "base's weights are stored in, bfloat16 for FLUX.1-dev; float32 on the cpu), "
                                        "float32, bfloat16, float16")


def _placement(args: argparse.Namespace) -> None:
    """--device / --dtype checked before any work: a GPU this machine lacks is a usage error."""
    from models.torch_device import pick_device, pick_dtype

    try:
        pick_dtype(args.dtype, pick_device(args.device))
    except ValueError as error:
        raise UsageError(str(error)) from None


@contextlib.contextmanager
def _fits_the_device(args: argparse.Namespace) -> Iterator[None]:
    """A GPU too small for the base (or for the render at --size) is a one-line usage error."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
        hint = "a smaller --size" if args.device == "cpu" else "a smaller --size or --device cpu"
        raise UsageError(f"the base does not fit on {args.device or 'the GPU'} ({first[:160]}); the whole base must "
                         f"fit (FLUX.1-dev in bfloat16: ~34 GB): try {hint}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from pipelines.fusion_methods import METHODS
    from pipelines.generate import BaseNotFound, resolve_base

    if args.fusion not in METHODS:
        raise UsageError(f"unknown fusion {args.fusion!r}; known: {', '.join(METHODS)}")
    _placement(args)
    registry = _open_registry(args.registry, create=False)
    world = _world_root(args.world) if args.world else None
    base = args.base or world
    if base is None:
        raise UsageError("give the base pipeline: --base FOLDER or --world DIR")
    try:
        resolve_base(base)  # a missing folder fails here, before gates are trained
    except BaseNotFound as error:
        raise UsageError(str(error)) from None
    with _fits_the_device(args), _generator(registry, base, args) as gen:
        gates = _gates(args, world, registry, base) if args.fusion.startswith("gated") else None
        if args.fusion.startswith("gated") and gates is None:
            print(f"autolora generate: warning: {NO_GATES}", file=sys.stderr)
        gen.gates = gates
        try:
            result = gen.generate(args.prompt, k=args.k, lora_ids=args.lora or None, seed=args.seed)
        except KeyError as error:
            raise UsageError(str(error.args[0])) from None
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.images[0]).save(args.output)
    info = {"output": args.output, "prompt": result.prompt, "loras": result.lora_ids, "fusion": result.method,
            "gates": getattr(gates, "version", None), "hits": result.hits}
    _print_json(info) if args.json else print(f"{args.output}: {result.prompt!r} with {len(result.lora_ids)} "
                                              f"LoRAs fused by {result.method}")
    return 0


RECIPE_FLAGS = ("steps", "lr", "time_features", "hinge", "composite", "seed")  # GateRecipe fields


def cmd_train_gates(args: argparse.Namespace) -> int:
    from pipelines.train_gates import GateRecipe, train_world_gates

    recipe = GateRecipe(**{name: getattr(args, name) for name in RECIPE_FLAGS if getattr(args, name) is not None})
    extra = {}
    if args.registry:
        result, extra = _train_registry_gates(args, recipe)
    else:
        placed = args.device is not None or args.dtype is not None
        if args.base or args.base_model or args.where or args.size or placed:
            raise UsageError("--base, --base-model, --where, --size, --device and --dtype train on a registry: "
                             "give --registry (a demo world's gates train on the cpu)")
        result = train_world_gates(_world_root(args.world), args.out, recipe)
    info = {"path": str(result.path), "version": result.version, "cached": result.cached,
            "seconds": round(result.seconds, 1), "recipe": dataclasses.asdict(recipe), **extra}
    _print_json(info) if args.json else print(
        f"gates {result.version} ({'cached' if result.cached else f'trained in {result.seconds:.0f} s'}): {result.path}")
    return 0


def _train_registry_gates(args: argparse.Namespace, recipe):
    from pipelines.generate import BaseNotFound
    from pipelines.registry_gates import PoolTooSmall, train_registry_gates

    if not args.base:
        raise UsageError("--registry needs --base: the diffusers pipeline (folder, demo world or Hub id) the gates are for")
    _placement(args)
    registry = _open_registry(args.registry, create=False)
    try:
        with _fits_the_device(args):
            trained = train_registry_gates(registry, args.base, base_model=args.base_model, where=args.where,
                                           recipe=recipe, size=args.size, out_dir=args.out, device=args.device,
                                           dtype=args.dtype)
    except PoolTooSmall as error:
        _print_skipped(error.skipped)
        raise UsageError(str(error)) from None
    except (BaseNotFound, ValueError) as error:
        raise UsageError(str(error)) from None
    _print_skipped(trained.skipped)
    return trained.training, {"pool": trained.pool, "skipped": trained.skipped}


def _print_skipped(skipped: dict[str, str]) -> None:
    for lora_id, why in skipped.items():
        print(f"skipped {lora_id}: {why}", file=sys.stderr)


def cmd_eval_fusion(args: argparse.Namespace) -> int:
    from pipelines.evaluate.fusion import METHODS, evaluate_fusion
    from pipelines.train_gates import AUTHORS_RECIPE, train_world_gates

    world = _world_root(args.world)
    unknown = [m for m in args.methods or [] if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r} for --methods; known: {', '.join(METHODS)}")
    _report_folder(args.out)
    gates = _gates(args, world)
    # the anchor row: gates trained the authors' way on the world's pool (once; cached by version like ours)
    anchor = "gated_paper" in (args.methods or METHODS)
    paper = train_world_gates(world, recipe=AUTHORS_RECIPE).gates if anchor else None
    report = evaluate_fusion(world, args.out, gates=gates, gates_paper=paper, n_sets=args.sets, n_prompts=args.prompts,
                             seed=args.seed, methods=args.methods or None, progress=not args.json)
    if args.json:
        _print_json(report)
        return 0
    keys = ("k2_accuracy", "k3_accuracy", "k2_worst", "k3_worst", "prompt_accuracy", "loss_ratio")
    _table("fusion on held-out LoRAs", ["method", *keys],
           [(m, *(f"{row[k]:.3f}" for k in keys)) for m, row in report.items()])
    print(f"report: {args.out}/fusion.md")
    return 0


def cmd_eval_generation(args: argparse.Namespace) -> int:
    from pipelines.evaluate.generation import SETTINGS, evaluate_generation

    from pipelines.evaluate.retrieval import NotEvaluable, manifest_ids

    world = _world_root(args.world)
    registry = _open_registry(args.registry, create=False)
    _report_folder(args.out)
    try:  # before any gates are trained for a world that is not the registry's
        entries = json.loads((world / "world.json").read_text(encoding="utf-8"))["loras"]
        manifest_ids(registry, world, [e for e in entries if e["split"] == "heldout"])
    except NotEvaluable as error:
        raise UsageError(str(error)) from None
    from pipelines.train_gates import AUTHORS_RECIPE, train_world_gates

    paper = train_world_gates(world, recipe=AUTHORS_RECIPE).gates  # the anchor rows' gates (cached once trained)
    report = evaluate_generation(registry, world, args.out, gates=_gates(args, world), gates_paper=paper,
                                 n_prompts=args.prompts, seed=args.seed, progress=not args.json)
    if args.json:
        _print_json(report)
        return 0
    cols = SETTINGS  # base, top-1/2/3, and the reference rows of the theme's own LoRA and trigger
    _table("prompt read-out accuracy on held-out themes", ["prompts", *cols],
           [(g, *("-" if report[g][c] is None else f"{report[g][c]:.3f}" for c in cols))
            for g in ("synonym", "canonical", "all")])
    print(f"report: {args.out}/generation.md")
    return 0


def add_commands(sub, evaluate, train=None) -> None:
    """Register ``generate`` on ``sub``, ``fusion`` / ``generation`` on ``evaluate`` and ``gates`` on
    ``train`` (the ``eval`` and ``train`` subparsers)."""
    from pipelines.cli import DEFAULT_REGISTRY

    if train is not None:
        gates = train.add_parser("gates", help="train the fusion gates on a demo world's training pool, or on a "
                                               "registry's LoRAs and their sample renders (cached by version: "
                                               "pool + recipe)")
        gates.add_argument("--world", default=".autolora/world", type=_expanded)
        gates.add_argument("--registry", type=_expanded, help="train on this registry's LoRAs instead (needs --base)")
        gates.add_argument("--base", type=_expanded, help="with --registry: the base pipeline, a folder, demo world or Hub repo id")
        gates.add_argument("--base-model", help="with --registry: whose LoRAs (default: the only base they have)")
        gates.add_argument("--where", help="with --registry: narrow the pool (a LanceDB SQL filter)")
        gates.add_argument("--size", type=_positive, help="with --registry: training image size (default: the base's)")
        _add_placement(gates, "with --registry: ")
        gates.add_argument("--out", type=_expanded,
                           help="checkpoint folder (default: <world>/gates, or <registry>/gates)")
        # recipe flags default to None = the recipe's own default, so building the parser imports no torch
        gates.add_argument("--steps", type=_positive)
        gates.add_argument("--lr", type=float)
        gates.add_argument("--time-features", type=int,
                           help="timestep-conditioned gates with this many sinusoidal features (0: off)")
        gates.add_argument("--hinge", type=float, help="weight of the hinge term (eq. 10 steps)")
        gates.add_argument("--composite", type=float,
                           help="share of steps on images of the whole active set (the rest: eq. 10)")
        gates.add_argument("--seed", type=int)
        gates.add_argument("--json", action="store_true")
        gates.set_defaults(func=cmd_train_gates)

    gen = sub.add_parser("generate", help="retrieve LoRAs for a prompt, fuse them and render")
    gen.add_argument("prompt")
    gen.add_argument("--registry", default=DEFAULT_REGISTRY, type=_expanded)
    gen.add_argument("-k", type=int, default=3, help="how many LoRAs to retrieve (0: none)")
    gen.add_argument("--fusion", default="gated", help="none, linear, ties, dare, klora, gated, gated_noglobal")
    gen.add_argument("-o", "--output", default="out.png", type=_expanded)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--lora", action="append", help="use this registry LoRA id (repeatable) instead of retrieval")
    gen.add_argument("--world", type=_expanded, help="a demo world: its base, and its gates (trained if missing)")
    gen.add_argument("--base", type=_expanded, help="a diffusers FLUX pipeline: a folder, a demo world or a Hub "
                                                    "repo id (black-forest-labs/FLUX.1-dev)")
    gen.add_argument("--gates", type=_expanded, help="a gate checkpoint (safetensors)")
    gen.add_argument("--steps", type=_positive, help="denoising steps (default: the base's usual: 28 for FLUX.1-dev)")
    gen.add_argument("--size", type=_positive, help="image size in pixels, a multiple of the base's vae_scale_factor "
                                                    "* 2 (16 for FLUX.1-dev; default: the base's: 1024 for FLUX.1-dev)")
    _add_placement(gen)
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=cmd_generate)

    fusion = evaluate.add_parser("fusion", help="fusion methods on held-out LoRA pairs and triples")
    fusion.add_argument("--world", default=".autolora/world", type=_expanded)
    fusion.add_argument("--out", default=".autolora/reports", type=_expanded)
    fusion.add_argument("--gates", type=_expanded, help="gate checkpoint (default: the world's, trained if missing; "
                        "the anchor row's gates are always the world's, trained the authors' way if missing)")
    fusion.add_argument("--sets", type=_positive, default=8, help="LoRA sets per k")
    fusion.add_argument("--prompts", type=_positive, default=8, help="prompts per set")
    fusion.add_argument("--methods", nargs="*", help="a subset of the methods")
    fusion.add_argument("--seed", type=int, default=0)
    fusion.add_argument("--json", action="store_true")
    fusion.set_defaults(func=cmd_eval_fusion)

    generation = evaluate.add_parser("generation", help="retrieval + gated fusion vs the base, held-out themes")
    generation.add_argument("--registry", default=DEFAULT_REGISTRY, type=_expanded)
    generation.add_argument("--world", default=".autolora/world", type=_expanded)
    generation.add_argument("--out", default=".autolora/reports", type=_expanded)
    generation.add_argument("--gates", type=_expanded)
    generation.add_argument("--prompts", type=_positive, default=8, help="prompts per held-out theme")
    generation.add_argument("--seed", type=int, default=0)
    generation.add_argument("--json", action="store_true")
    generation.set_defaults(func=cmd_eval_generation)
