"""``autolora caption``: caption a registry's sample renders with a vision model behind an
OpenAI-compatible server, as the Dagster asset ``lora_captions`` does: attach to a running server
(``--url``) or serve a model folder / Hub id with vLLM for the duration (``--model``); LoRAs that
came without any render are first rendered by their base (``--base BASE_MODEL=PIPELINE``)."""

from __future__ import annotations

import argparse
import os
import sys

from pipelines.cli import DEFAULT_REGISTRY, UsageError, _expanded, _open_registry, _positive, _print_json

DEFAULT_RENDERS = 3  # self-rendered images per LoRA without any (the asset's default too)
DEFAULT_MAX_MODEL_LEN, DEFAULT_DTYPE = 256, "float32"  # the tiny CPU captioner's (the resource's defaults too)


def _base_pipeline(text: str) -> tuple[str, str]:
    """``BASE_MODEL=PIPELINE`` as a pair; anything else is an argparse (usage) error."""
    name, sep, pipeline = text.partition("=")
    if not sep or not name.strip() or not pipeline.strip():
        raise argparse.ArgumentTypeError(f"expected BASE_MODEL=PIPELINE, e.g. FLUX.1-dev=~/models/FLUX.1-dev, "
                                         f"not {text!r}")
    return name.strip(), _expanded(pipeline.strip())


def _base_pipelines(registry, given: list[tuple[str, str]]) -> dict[str, str]:
    """``{base model: pipeline folder}`` from the ``--base`` pairs: each name a base the registry
    knows, each pipeline a diffusers folder or built demo world (checked before anything runs)."""
    if not given:
        return {}
    from pipelines.generate import BaseNotFound, resolve_base  # imports diffusers: only when rendering may happen

    known, pipelines = registry.base_names(), {}
    for name, pipeline in given:
        if name not in known:
            raise UsageError(f"--base {name}=...: the registry knows no base model {name!r} "
                             f"(known: {', '.join(known)})")
        if pipelines.get(name, pipeline) != pipeline:
            raise UsageError(f"--base {name}=... given twice with different pipelines")
        try:
            pipelines[name] = resolve_base(pipeline)
        except BaseNotFound as error:
            raise UsageError(f"--base {name}=...: {error}") from None
    return pipelines


def _endpoint(args: argparse.Namespace):
    """The captioner the flags describe (the captioner resource's defaults otherwise)."""
    from pipelines.captioner_endpoint import CaptionerEndpoint

    cache = args.cache_dir if args.cache_dir is not None else os.environ.get(
        "AUTOLORA_CAPTION_CACHE", ".autolora/caption-cache")
    max_model_len = DEFAULT_MAX_MODEL_LEN if args.max_model_len is None else args.max_model_len
    return CaptionerEndpoint(url=args.url or "", model_dir=args.model or "", served_name=args.served_name or "",
                             max_model_len=max_model_len or None, dtype=args.dtype or DEFAULT_DTYPE,
                             extra_args=tuple(args.vllm_arg or ()), cache_dir=cache)


def _check_flags(args: argparse.Namespace) -> None:
    """Usage errors: flags that would be ignored, a --model that names nothing."""
    from pipelines.vllm_server import is_model_source

    if args.renders is not None and not args.base:
        raise UsageError("--renders sets how many images --base renders per LoRA without any: give --base too")
    if args.url:
        given = [flag for flag, value in (("--max-model-len", args.max_model_len), ("--dtype", args.dtype),
                                          ("--vllm-arg", args.vllm_arg)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} set how --model is served: a server at --url is already running")
    if args.model and not is_model_source(args.model):
        raise UsageError(f"--model: {args.model!r} is neither an existing model folder nor a Hub repo id "
                         "(owner/name)")


def cmd_caption(args: argparse.Namespace) -> int:
    from pipelines.caption_registry import caption_registry, idle_report, pending_captions
    from pipelines.vllm_server import VLLMServerError
    from registry import RegistryNotWritable

    _check_flags(args)
    registry = _open_registry(args.registry, create=False)
    try:
        registry.check_writable()  # before a server starts, not a lance error after a minute of captioning
    except RegistryNotWritable as error:
        raise UsageError(str(error)) from None
    pipelines = _base_pipelines(registry, args.base or [])
    endpoint = _endpoint(args)
    model = endpoint.model_name()
    if model is not None and pending_captions(registry, model, pipelines) == 0:  # no server started for nothing
        report = idle_report(registry, model)
        if args.json:
            show(report, as_json=True)
        else:
            _show_problems(report)
            print(f"nothing to caption: {report.up_to_date} LoRAs have captions of {model}, {len(report.skipped)} "
                  "cannot get any (no render, no --base for their base model); no server started")
        return 0
    report, server = None, {"pid": None, "start_seconds": 0.0}
    try:
        with endpoint.connect() as (captioner, server):
            report = caption_registry(registry, captioner, base_pipelines=pipelines,
                                      n_renders=args.renders or DEFAULT_RENDERS)
    except VLLMServerError as error:  # the server did not come up or died, or nothing answers at --url
        if report is not None:  # what was captioned before the server died is written: say so
            show(report, args.json, server_started=True, start_seconds=server["start_seconds"])
        print(f"autolora caption: {error}", file=sys.stderr)
        return 1
    show(report, args.json, server_started=server["pid"] is not None, start_seconds=server["start_seconds"])
    return 1 if report.failed or report.stopped else 0


def show(report, as_json: bool, server_started: bool = False, start_seconds: float = 0.0) -> None:
    """``report`` (a :class:`pipelines.caption_registry.CaptionReport`) as JSON, or as the
    :func:`summary` line with each skipped or failed LoRA and its reason on stderr."""
    if as_json:
        _print_json({**report.to_dict(), "server_started": server_started, "server_start_seconds": start_seconds})
        return
    _show_problems(report)
    print(summary(report))
    if report.stopped:
        print(f"autolora caption: stopped: {report.stopped}; {report.left} LoRAs left for a rerun", file=sys.stderr)


def _show_problems(report) -> None:
    for kind, problems in (("skipped", report.skipped), ("failed", report.failed)):
        for problem in problems:
            name = f" ({problem['name']})" if problem.get("name") else ""
            print(f"{kind} {problem['lora_id']}{name}: {problem['reason']}", file=sys.stderr)


def summary(report) -> str:
    """One line for a :class:`pipelines.caption_registry.CaptionReport`."""
    left = f", {report.left} left (stopped)" if report.stopped else ""
    return (f"{report.captioned} LoRAs captioned by {report.model} ({report.images} renders, {report.cached} from "
            f"the cache), {len(report.self_rendered)} self-rendered, {report.up_to_date} up to date, "
            f"{len(report.skipped)} skipped, {len(report.failed)} failed{left}")


def add_commands(sub) -> None:
    """Register ``caption`` on the top-level subparsers."""
    cmd = sub.add_parser("caption", help="caption the registry's sample renders with a vision model "
                                         "(vLLM or any OpenAI-compatible server)",
                         description="Caption the registry's sample renders. Exit status: 0 when every LoRA it "
                                     "tried was captioned, 1 when any failed or the server died or stopped "
                                     "answering (what was captioned is kept; a rerun goes on), 2 on a usage "
                                     "error, 130 on Ctrl-C, SIGTERM or SIGHUP (a launched server is stopped).")
    cmd.add_argument("--registry", default=DEFAULT_REGISTRY, type=_expanded, metavar="DIR")
    server = cmd.add_mutually_exclusive_group(required=True)
    server.add_argument("--url", metavar="URL", help="a running OpenAI-compatible server to attach to (left running)")
    server.add_argument("--model", type=_expanded, metavar="MODEL_DIR_OR_HUB_ID",
                        help="a model folder or Hub id served by vLLM (.venv-vllm) for the duration")
    cmd.add_argument("--served-name", metavar="NAME",
                     help="the model name to ask for (default: the first model --url lists, the --model folder's "
                          "name and a hash of its config and weight headers, or the Hub id); captions carry it")
    cmd.add_argument("--base", action="append", type=_base_pipeline, metavar="BASE_MODEL=PIPELINE",
                     help="render LoRAs of BASE_MODEL that came without any sample render with PIPELINE "
                          "(a diffusers pipeline folder, built demo world or Hub id), then caption those; repeatable")
    cmd.add_argument("--renders", type=_positive, metavar="N",
                     help=f"with --base: images per such LoRA (default {DEFAULT_RENDERS})")
    cmd.add_argument("--cache-dir", type=_expanded, metavar="DIR",
                     help="captions cached by image hash, model and prompt (default: $AUTOLORA_CAPTION_CACHE or "
                          ".autolora/caption-cache; '' for none)")
    cmd.add_argument("--max-model-len", type=int, metavar="N",
                     help=f"with --model: vLLM's --max-model-len (default {DEFAULT_MAX_MODEL_LEN}, the tiny CPU "
                          "model's; 0: vLLM's choice, which a real Qwen2.5-VL needs)")
    cmd.add_argument("--dtype", help=f"with --model: vLLM's --dtype (default {DEFAULT_DTYPE}, for CPUs)")
    cmd.add_argument("--vllm-arg", action="append", metavar="ARG",
                     help="with --model: one more vLLM server argument, e.g. --vllm-arg=--tensor-parallel-size=2")
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(func=cmd_caption)
