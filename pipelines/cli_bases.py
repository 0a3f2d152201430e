"""``autolora register-base``: make LoRAs of another base model recognisable, from a pipeline
folder, a demo world or a ``base_model.json``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipelines.cli import DEFAULT_REGISTRY, UsageError, _expanded, _open_registry, _print_json


def add_commands(sub) -> None:
    """Add ``register-base`` to the ``autolora`` subcommands ``sub``."""
    base = sub.add_parser("register-base", help="make LoRAs for a base model recognisable")
    base.add_argument("source", help="a diffusers FLUX pipeline folder, a demo world folder (or the folder "
                                     "holding one), a base_model.json, or the Hub id of a FLUX pipeline (only its "
                                     "transformer/config.json is read: from the Hugging Face cache, or downloaded "
                                     "with HF_HUB_OFFLINE=0)")
    base.add_argument("--name", help="the name to register it under (default: the JSON's name; for a folder the "
                                     "name in a base_model.json beside it, else the folder's parent's name; for a "
                                     "Hub id the id); a name already given to a base with other layer shapes is "
                                     "refused")
    base.add_argument("--registry", default=DEFAULT_REGISTRY, type=_expanded)
    base.add_argument("--json", action="store_true")
    base.set_defaults(func=cmd_register_base)


def cmd_register_base(args: argparse.Namespace) -> int:
    from models.hub_ids import looks_like_hub_repo_id

    source = Path(os.path.expandvars(os.path.expanduser(args.source)))
    if args.name is not None and not args.name.strip():
        raise UsageError("--name must not be empty")
    if source.exists():
        base = _base_from_folder(source, args.name) if source.is_dir() else _base_from_json(source, args.name)
    elif looks_like_hub_repo_id(args.source, owner_required=True):
        base = _base_from_hub(args.source, args.name)
    else:
        raise UsageError(f"no such pipeline folder, demo world or base_model.json, and not a Hub repo id: {source}")
    existing = next((b for b in _known_bases(args.registry) if b.name == base.name), None)
    if existing is not None and not existing.same_layers(base):
        raise UsageError(f"a different base named {base.name!r} is already known ({existing.architecture}, "
                         f"{len(existing.layer_shapes)} layers; this one has {len(base.layer_shapes)}): "
                         f"register it under another name with --name")
    if existing is None:  # the same base again is a no-op: nothing is written
        _open_registry(args.registry).register_base(base)
    result = {"name": base.name, "architecture": base.architecture, "layers": len(base.layer_shapes),
              "already_registered": existing is not None}
    _print_json(result) if args.json else print(
        f"{base.name} is already registered with these layer shapes" if existing is not None
        else f"registered {base.name} ({len(base.layer_shapes)} layers)")
    return 0


_BASE_EXPECTED = ("expected a diffusers FLUX pipeline folder (with transformer/config.json), a demo world "
                  "folder (or the folder holding one), a base_model.json, or a FLUX pipeline's Hub id")


def _base_from_folder(folder, name: str | None):
    """The base of a pipeline folder, or of a demo world's ``base/`` (resolved as
    :func:`pipelines.generate.resolve_base` does), described from its transformer config."""
    from pipelines.generate import BaseNotFound, resolve_base

    pipeline = folder.resolve()
    if not (pipeline / "transformer" / "config.json").is_file():
        try:
            pipeline = Path(resolve_base(folder))
        except BaseNotFound:
            raise UsageError(f"{folder}: no pipeline or demo world there; {_BASE_EXPECTED}") from None
    config_file = pipeline / "transformer" / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{config_file} is unreadable ({error}); {_BASE_EXPECTED}") from None
    kind = config.get("_class_name", "FluxTransformer2DModel") if isinstance(config, dict) else None
    if kind != "FluxTransformer2DModel":
        raise UsageError(f"{config_file} does not describe a FluxTransformer2DModel ({kind!r}); {_BASE_EXPECTED}")
    from registry.lora.base_models import flux_base_from_folder

    try:
        return flux_base_from_folder(pipeline, name or _described_name(pipeline))
    except (OSError, ValueError, TypeError) as error:  # a config diffusers cannot build a transformer from
        raise UsageError(f"{config_file}: not a FLUX transformer config ({error}); {_BASE_EXPECTED}") from None


def _base_from_hub(repo_id: str, name: str | None):
    """The base of the FLUX pipeline ``repo_id`` on the Hub, from its transformer config alone
    (the cached one, or downloaded when HF_HUB_OFFLINE is off), named ``name`` or the id."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from models.text_encoder import hub_load_failure

    try:
        config_file = Path(hf_hub_download(repo_id, "transformer/config.json"))
    except EntryNotFoundError as error:
        if isinstance(error, LocalEntryNotFoundError):  # offline and not cached, or the Hub out of reach
            raise UsageError(hub_load_failure("FLUX pipeline config", repo_id, error)) from None
        raise UsageError(f"the Hub repo {repo_id!r} has no transformer/config.json; {_BASE_EXPECTED}") from None
    except Exception as error:  # huggingface_hub: offline and not cached, missing or gated repo, network
        raise UsageError(hub_load_failure("FLUX pipeline config", repo_id, error)) from None
    return _base_from_folder(config_file.parent.parent, name or repo_id)


def _base_from_json(path, name: str | None):
    """A ``base_model.json`` (``{"name", "architecture", "layer_shapes": {module: [out, in]}}``),
    renamed to ``name`` when given; anything else is a usage error."""
    from registry.lora.base_models import BaseModel

    try:
        return BaseModel.from_json(path.read_text(encoding="utf-8"), name)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UsageError(f"{path} is not a base_model.json ({error}): expected a JSON object with \"name\", "
                         "\"architecture\" and \"layer_shapes\" (at least one module: [out_features, "
                         "in_features]), or a pipeline folder") from None


def _known_bases(path: str):
    """The bases of the registry at ``path``, or the built-ins where it holds none (nothing is created)."""
    from registry import Registry, RegistryNotFound
    from registry.lora.base_models import builtin_bases

    try:
        return Registry.open(path, create=False).bases()
    except RegistryNotFound:
        return builtin_bases()


def _described_name(pipeline: Path) -> str | None:
    """The name in a ``base_model.json`` beside (or in) a pipeline folder, so a base has one name
    whichever route registers it (the demo world writes one next to its pipeline)."""
    for candidate in (pipeline / "base_model.json", pipeline.parent / "base_model.json"):
        try:
            name = json.loads(candidate.read_text(encoding="utf-8")).get("name") if candidate.is_file() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            name = None
        if isinstance(name, str) and name.strip():
            return name
    return None
