"""Generation: retrieve the top-k LoRAs for a prompt, add their trigger words, fuse, render.

``Generator`` holds one base pipeline for its lifetime.  With a gated method it keeps one
``GatedSession`` attached, so a new LoRA set for the next prompt is copied into the wrappers in
place (``GatedFusion.set_loras``); the base is never reloaded.  Loaded LoRAs are cached by id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from huggingface_hub import constants as hf_constants

from models.hub_ids import looks_like_hub_repo_id
from models.text_encoder import hub_load_failure
from models.torch_device import pick_device, pick_dtype
from pipelines.fusion_methods import GatedSession, GateSet, get
from pipelines.fusion_methods.base import Lora

GATED = ("gated", "gated_noglobal")


@dataclass
class Generation:
    """What one call rendered and with what."""

    images: np.ndarray                 # (N, H, W, 3) uint8
    prompt: str                        # the prompt as rendered (trigger words added)
    lora_ids: list[str]
    method: str
    hits: list[dict] = field(default_factory=list)  # retrieval hits (empty when LoRAs were given)


@dataclass(frozen=True)
class RenderSettings:
    """How the Generator renders: denoising steps, square image size, true CFG (> 1: against an
    empty prompt) and a guidance-distilled base's guidance scale."""

    steps: int
    size: int
    true_cfg: float
    guidance: float | None = None

    @classmethod
    def for_base(cls, pipe: FluxPipeline) -> RenderSettings:
        """The settings for a loaded base pipeline (see :meth:`for_transformer`)."""
        return cls.for_transformer(pipe.transformer.config)

    @classmethod
    def for_transformer(cls, config) -> RenderSettings:
        """FLUX.1-dev's usual settings for a FLUX.1-width transformer (3072), else the demo
        world sampler's (its tiny base is trained for 32 px, 12 steps, true CFG 1.5); ``config``:
        the transformer's config (a mapping)."""
        from pipelines.world.sampling import CFG, STEPS

        if config["num_attention_heads"] * config["attention_head_dim"] == FLUX1_WIDTH:
            return cls(steps=28, size=1024, true_cfg=1.0, guidance=3.5)
        return cls(steps=STEPS, size=32, true_cfg=CFG)


FLUX1_WIDTH = 3072
LARGEST_SIZE_FACTOR = 4  # sizes above 4x the base's usual one are refused (a typo, not a render)


def check_size(size: int, multiple: int, usual: int) -> None:
    """ValueError unless ``size`` is a positive multiple of ``multiple`` (FLUX packs 2x2 latent
    patches: ``vae_scale_factor * 2``) and at most ``LARGEST_SIZE_FACTOR`` x the base's ``usual`` size."""
    if size < 1 or size % multiple:
        below = max(multiple, size // multiple * multiple)
        raise ValueError(f"image size {size} is not a positive multiple of {multiple}, which this base needs "
                         f"(e.g. {below} or {below + multiple})")
    if size > LARGEST_SIZE_FACTOR * usual:
        raise ValueError(f"image size {size} is over {LARGEST_SIZE_FACTOR}x this base's usual {usual} px "
                         f"(at most {LARGEST_SIZE_FACTOR * usual})")


class BaseNotFound(FileNotFoundError):
    """The base is neither a local pipeline folder (or demo world) nor a Hub repo id that loads."""


def base_config(source: str, component: str) -> dict:
    """The ``config.json`` of a resolved base's ``component`` ("vae", "transformer", ...) without
    loading any weights: from the folder, or for a Hub id from the Hub (cache first)."""
    if Path(source).is_dir():
        file: str | Path = Path(source) / component / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = hf_hub_download(source, f"{component}/config.json")
        except (OSError, ValueError) as error:  # offline and not cached, gated, missing, bad id
            raise BaseNotFound(hub_load_failure("base", source, error)) from error
    try:
        return json.loads(Path(file).read_text())
    except (OSError, ValueError) as error:  # a folder missing a component, or a broken config
        raise BaseNotFound(f"cannot load the base in the folder {source}: its {component}/config.json "
                           f"is {'missing' if isinstance(error, FileNotFoundError) else 'unreadable'}") from None


def _local_folder(source: str) -> Path | None:
    """Where a resolved base's files are on this machine: the folder itself, or for a Hub id the
    snapshot in the Hugging Face cache (None when it was never downloaded); nothing is fetched."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "model_index.json")
    return Path(cached).parent if isinstance(cached, str) else None


def transformer_weight_files(source: str) -> list[Path]:
    """The transformer's safetensors files diffusers loads for a resolved base (:func:`resolve_base`),
    where they are on this machine (the folder, or a Hub id's snapshot in the cache): those its index
    names, else the single ``diffusion_pytorch_model.safetensors`` (variants and strays beside them are
    not the weights); empty when they are not here."""
    folder = _local_folder(source)
    if folder is None:
        return []
    transformer = folder / "transformer"
    index = transformer / "diffusion_pytorch_model.safetensors.index.json"
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
            "diffusion_pytorch_model.safetensors"]
    except (OSError, ValueError, KeyError, AttributeError):
        return []
    files = [transformer / name for name in names]
    return files if all(f.is_file() for f in files) else []


def size_multiple(vae_config) -> int:
    """Image sizes a FLUX base renders exactly are multiples of this: ``vae_scale_factor * 2``
    (the VAE halves per extra block; FLUX packs 2x2 latent patches), 16 for FLUX.1-dev."""
    return 2 * 2 ** (len(vae_config["block_out_channels"]) - 1)


def resolve_base(source: str | os.PathLike) -> str:
    """``source`` as ``FluxPipeline.from_pretrained`` takes it: an existing local pipeline folder,
    absolute (a demo world folder, or a folder holding one built world: its ``base/``) or a Hub repo id
    ("owner/name" that is no local path); anything else raises :class:`BaseNotFound`."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()  # one spelling per folder: gates are matched to their base by it
        if (path / "model_index.json").is_file():
            return str(path)
        worlds = [path] if (path / "world.json").is_file() else [w.parent for w in path.glob("*/world.json")]
        if len(worlds) == 1 and (worlds[0] / "base" / "model_index.json").is_file():
            return str(worlds[0] / "base")
        raise BaseNotFound(f"{text} is neither a diffusers pipeline folder (no model_index.json) "
                           "nor a built demo world")
    if not looks_like_hub_repo_id(text, owner_required=True):
        raise BaseNotFound(f"no such base pipeline: {text} (neither an existing folder nor a Hub repo id "
                           "such as black-forest-labs/FLUX.1-dev)")
    return text


@contextmanager
def loading_output(progress: bool = False) -> Iterator[None]:
    """While loading: diffusers / transformers progress bars on when ``progress``, else no bars and
    no warnings (each library's settings restored after)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for module, _, _ in saved:
        if progress:
            module.enable_progress_bar()
        else:
            module.set_verbosity_error()
            module.disable_progress_bar()
    try:
        yield
    finally:
        for module, level, bar in saved:
            module.set_verbosity(level)
            module.enable_progress_bar() if bar else module.disable_progress_bar()


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(base: str) -> torch.dtype | None:
    """The precision a resolved base's transformer weights are stored in (one safetensors header
    read, from the folder or the Hub cache); None for a Hub base not downloaded yet."""
    from safetensors import SafetensorError, safe_open

    files = transformer_weight_files(base)
    if not files:
        return None
    try:
        with safe_open(str(files[0]), "pt") as f:
            first = next(iter(f.keys()), None)
            return SAFETENSORS_DTYPES.get(f.get_slice(first).get_dtype()) if first else None
    except (OSError, SafetensorError):
        return None


def load_base(source: FluxPipeline | str | os.PathLike, progress: bool = False, *,
              device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> FluxPipeline:
    """A pipeline, else :func:`resolve_base`'s folder or Hub repo id loaded (quietly unless
    ``progress``) in ``dtype`` onto ``device`` (``auto``/None: the accelerator if torch sees one, in
    the precision the weights are stored in (:func:`stored_dtype`; a Hub id: bfloat16), else the CPU
    in float32; :mod:`models.torch_device`).  A pipeline given is used where
    it is unless ``device`` / ``dtype`` are named.  A Hub id that cannot be loaded (offline, gated,
    missing) raises :class:`BaseNotFound`; a device or dtype this machine lacks, ValueError."""
    if isinstance(source, FluxPipeline):
        if device is None and dtype is None:
            return source
        where = pick_device(device or source.device)
        now = source.transformer.dtype  # dtype None keeps it; "auto" treats it as the stored precision
        with loading_output(progress):  # (diffusers warns on every cast that no module must stay float32)
            return source.to(where, pick_dtype(now if dtype is None else dtype, where, now))
    where = pick_device(device)
    name = resolve_base(source)
    precision = pick_dtype(dtype, where, stored_dtype(name))
    with loading_output(progress):
        try:  # offline, a cached Hub base is read as such (else huggingface_hub warns it could not reach the Hub)
            pipe = FluxPipeline.from_pretrained(name, dtype=precision, local_files_only=hf_constants.HF_HUB_OFFLINE)
            pipe = pipe.to(where)
        except (OSError, ValueError, TypeError) as error:  # a folder that is no whole FLUX pipeline, a Hub id
            if not (isinstance(error, OSError) or Path(name).exists()):
                raise
            raise BaseNotFound(hub_load_failure("base", name, error)) from error
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_triggers(prompt: str, triggers: Sequence[str]) -> str:
    """``prompt`` with the trigger words it lacks put in front (in order, each once)."""
    missing = []
    for t in triggers:
        if t and t.lower() not in prompt.lower() and t not in missing:
            missing.append(t)
    return ", ".join([*missing, prompt]) if missing else prompt


class Generator:
    """Prompt -> retrieved LoRAs -> fused generation on one base held for the object's lifetime."""

    def __init__(self, registry, base: FluxPipeline | str | Path, gates: GateSet | str | Path | None = None,
                 method: str = "gated", render: RenderSettings | None = None, progress: bool = False, *,
                 device: str | None = None, dtype: str | None = None) -> None:
        """``device`` / ``dtype``: where and in what precision the base runs (:func:`load_base`;
        default: a GPU if torch sees one, in the precision the weights are stored in, else the CPU
        in float32)."""
        from pipelines.train_gates import load_gates

        self.registry = registry
        self.pipe = load_base(base, progress=progress, device=device, dtype=dtype)
        self.settings = render or RenderSettings.for_base(self.pipe)
        self.gates = load_gates(gates) if isinstance(gates, (str, Path)) else gates
        self.method = get(method).name
        self._loras: dict[str, Lora] = {}
        self._session: GatedSession | None = None

    @property
    def size_multiple(self) -> int:
        """Image sizes this base renders exactly are multiples of this (:func:`size_multiple`)."""
        return 2 * int(getattr(self.pipe, "vae_scale_factor", 8))

    @property
    def settings(self) -> RenderSettings:
        """How this generator renders; setting it checks the size (:func:`check_size`, ValueError)."""
        return self._settings

    @settings.setter
    def settings(self, value: RenderSettings) -> None:
        check_size(value.size, self.size_multiple, RenderSettings.for_base(self.pipe).size)
        self._settings = value

    def retrieve(self, prompt: str, k: int) -> list:
        """The registry's top-``k`` hits for ``prompt``."""
        return list(self.registry.search(prompt, k=k))

    def lora(self, lora_id: str) -> Lora:
        """A registry LoRA as canonical float32 layers (loaded once)."""
        from registry.lora.inspect import load_canonical

        if lora_id not in self._loras:
            if self.registry.get(lora_id) is None:
                raise KeyError(f"no LoRA {lora_id!r} in the registry")
            self._loras[lora_id] = load_canonical(self.registry.blob_path(lora_id), self.registry.bases())[0].layers
        return self._loras[lora_id]

    def triggers(self, lora_id: str) -> list[str]:
        row = self.registry.get(lora_id) or {}
        words = row.get("trigger_words") or []
        return [str(w) for w in (json.loads(words) if isinstance(words, str) else words)]

    def _fusion(self, method: str):
        if method in GATED:
            if self._session is None:
                self._session = GatedSession(self.pipe, self.gates)
        elif self._session is not None:  # diffusers/PEFT methods need the plain linear layers back
            self._session.close()
            self._session = None
        return get(method)

    def generate(self, prompt: str, *, k: int = 3, lora_ids: Sequence[str] | None = None,
                 method: str | None = None, seed: int = 0, n: int = 1, add_triggers: bool = True) -> Generation:
        """Render ``n`` images of ``prompt`` with ``lora_ids`` (default: the top-``k`` retrieved)."""
        method = method or self.method
        hits: list[dict] = []
        if lora_ids is None:
            found = self.retrieve(prompt, k) if k > 0 else []
            hits = [h.to_dict() for h in found]
            ids, triggers = [h.lora_id for h in found], [w for h in found for w in h.trigger_words]
        else:
            ids = list(lora_ids)
            triggers = [w for i in ids for w in self.triggers(i)]
        text = with_triggers(prompt, triggers) if add_triggers else prompt
        return Generation(self.render([text] * n, ids, seed, method), text, ids, method, hits)

    def render(self, prompts: Sequence[str], lora_ids: Sequence[str], seed: int = 0,
               method: str | None = None, gates: GateSet | None = None) -> np.ndarray:
        """Render ``prompts`` (as given) in one batch with ``lora_ids`` fused by ``method`` (``gates``:
        other gates than the generator's for this call, e.g. the anchor's in a report)."""
        from pipelines.world.sampling import generate

        loras = [self.lora(i) for i in lora_ids]
        with self._fusion(method or self.method).apply(self.pipe, loras, gates=gates or self.gates):
            r = self.settings
            return generate(self.pipe, list(prompts), seed, steps=r.steps, cfg=r.true_cfg, size=r.size,
                            guidance=r.guidance)

    def close(self) -> None:
        """Detach the gated fusion (the base is exactly as loaded)."""
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
