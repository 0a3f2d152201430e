"""The LoRA-weight encoder trained on a registry's own LoRAs, versioned by what it was trained on.

The training pool is the registry's LoRAs of one base model (optionally narrowed by a SQL
``where``); each LoRA's texts are its card (name, description, tags), its render prompts and its
captions. The version id is a hash of the pool (its LoRA ids), the design and the recipe, so an
unchanged pool is never trained twice: :func:`train_registry_encoder` returns the registered
version instead. Registering it embeds every LoRA of that base with it and switches search to it
in one step (:meth:`registry.Registry.register_encoder`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from models.encoder import EncoderConfig, LoRAWeightEncoder
from models.encoder_tokens import LayerSpec
from models.text_encoder import CLIP_PREFIX, text_encoder_for
from pipelines.train_encoder import train_encoder
from registry import Registry
from registry.lora.inspect import load_canonical
from registry.store.search import NOT_REMOVED
from registry.store.store import quote

RECIPE_VERSION = 4  # bump when the training recipe changes: every pool is trained again (4: PROBED_VIEWS)
DESIGNS = {"ours": EncoderConfig.ours, "paper": EncoderConfig.paper}
LR = 1e-3
# With the base's input directions as fixed probes, our design has no transformer blocks: the
# mean of the layer tokens is pooled (so the embedding is linear in each module type's summed
# responses before its norm and head), trained at a higher rate. On the demo world's 29 held-out
# LoRAs (`train_encoder` on the 60 training LoRAs, seeds 0/1/2) it gave R@3 0.588 / 0.549 / 0.686,
# MRR 0.525 / 0.499 / 0.572, within - cross cosine 0.445 / 0.341 / 0.415 (at lr 3e-3: 0.575, 0.495,
# 0.375 on average) against 0.431 / 0.549 / 0.490, 0.389 / 0.417 / 0.453, 0.384 / 0.282 / 0.238 with
# two blocks and a CLS token (at lr 3e-3 no better: seed 2 R@3 0.431): 60 training LoRAs are too
# few for the blocks. A closed-form ridge read-out of the same summed responses gives R@3 0.627,
# MRR 0.523; dropout, width 128, one block or more weight decay stayed in the seed noise.
PROBED = {"probe_sharing": "layer", "probes": 1, "depth": 0, "pool": "mean"}
PROBED_LR = 1e-2
# ... and each LoRA of a step's batch as 4 augmented views (train_encoder's ``views``). Measured on the
# demo world's 29 held-out LoRAs, 16 training seeds (benchmarks/encoder_seeds.py), 1 view -> 4: R@3
# 0.605 -> 0.623, MRR 0.521 -> 0.531, R@1 0.367 -> 0.371, within - cross cosine 0.392 -> 0.413 (higher
# on 12 seeds of 16; 11 seeds >= 0.4 against 7); 2 views 0.612 / 0.513 / 0.406. On seeds 0-7 (1 view:
# 0.598 / 0.517 / 0.391) 600 steps of 1 view, as many encoder passes as 2 views, gave 0.576 / 0.499 /
# 0.392. Training the demo's pool takes ~2-3x as long (~15 s -> ~35 s).
PROBED_VIEWS = 4


@dataclass(frozen=True)
class Recipe:
    """How an encoder is trained (part of its version id)."""

    design: str = "ours"
    steps: int = 300
    batch_size: int = 32
    lr: float | None = None  # None: the design's own (LR, or PROBED_LR with fixed probes)
    seed: int = 0
    # the base as a diffusers pipeline (folder, Hub id or demo world): when given, the design's
    # probes are per layer and fixed to the directions of the inputs the base feeds each layer
    # while rendering the pool's texts (pipelines/activation_probes.py); empty: learned probes
    probes_from: str = ""
    # the frozen text side: "" the bundled all-MiniLM-L6-v2; "clip" the CLIP text encoder of the
    # ``probes_from`` pipeline; "clip:<pipeline>" another pipeline's; else a sentence-transformers
    # path or Hub id (models.text_encoder.load_text_encoder)
    text_encoder: str = ""

    def __post_init__(self) -> None:
        # local folders absolute (Hub ids and names as given): the recipe is recorded with its
        # encoder and a retraining (the Dagster sensor) may run from another working directory
        object.__setattr__(self, "probes_from", _absolute(self.probes_from))
        if self.text_encoder != "clip":  # "clip": the probes_from pipeline's, a name, never a folder
            prefix = CLIP_PREFIX if self.text_encoder.startswith(CLIP_PREFIX) else ""
            object.__setattr__(self, "text_encoder", prefix + _absolute(self.text_encoder[len(prefix):]))


def _absolute(value: str) -> str:
    """``value`` as an absolute path when it names an existing local file or folder, else as is."""
    path = Path(value).expanduser()
    return str(path.resolve()) if value and path.exists() else value


def text_encoder_spec(recipe: Recipe) -> str:
    """The text encoder ``recipe`` names, as recorded with the encoder ("" for the default)."""
    if recipe.text_encoder == "clip":
        if not recipe.probes_from:
            raise ValueError("text encoder 'clip' means the CLIP text encoder of the --probes-from pipeline: "
                             "give one, or name a pipeline with 'clip:<pipeline>'")
        source = Path(recipe.probes_from)
        return CLIP_PREFIX + str(source / "base" if (source / "world.json").is_file() else source)  # a demo world's base
    return recipe.text_encoder


def lora_texts(row: dict) -> list[str]:
    """The texts a LoRA is described by: its card, render prompts and captions (no empty ones)."""
    card = " ".join(filter(None, [row.get("name") or "", row.get("description") or "",
                                  ", ".join(row.get("tags") or [])]))
    texts = [card, *(row.get("render_prompts") or []), *(row.get("captions") or [])]
    return [t for t in (t.strip() for t in texts) if t]


def pool_condition(base_model: str, where: str | None = None) -> str:
    """The SQL filter of a training pool: not removed, of ``base_model``, matching ``where``."""
    clauses = [f"base_model = {quote(base_model)}", NOT_REMOVED]
    if where:
        clauses.append(f"({where})")
    return " AND ".join(clauses)


class PoolError(ValueError):
    """A pool that cannot be trained on: an unknown base model, a bad ``where``, too few LoRAs."""


def pool_size(reg: Registry, base_model: str, where: str | None = None) -> int:
    """How many LoRAs the pool's filter matches; an unknown base model or a ``where`` LanceDB cannot
    run is a :class:`PoolError` saying so (read before any model is loaded)."""
    known = sorted(reg.base_names())  # names only: no base's layer shapes are built
    if base_model not in known:
        raise PoolError(f"unknown base model {base_model!r}; the registry knows: {', '.join(known) or 'none'}")
    try:
        return reg.loras.count_rows(pool_condition(base_model, where))
    except ValueError as error:  # LanceDB: a parse or schema error
        why = " ".join(str(error).split())[:200]
        raise PoolError(f"the filter (where) {where!r} is not valid SQL for the registry: {why}") from None


def pool_rows(reg: Registry, base_model: str, where: str | None = None) -> list[dict]:
    """The rows of the training pool: not removed, of ``base_model``, matching ``where``
    (:func:`pool_size` checks the base and the filter)."""
    n = pool_size(reg, base_model, where)
    condition = pool_condition(base_model, where)
    columns = ["lora_id", "blob", "name", "description", "tags", "render_prompts", "captions"]
    rows = reg.rows(reg.loras, condition, n, columns) if n else []
    return sorted(rows, key=lambda r: r["lora_id"])


def layer_specs(reg: Registry, base_model: str) -> list[LayerSpec]:
    """Every linear layer of the base model (so LoRAs adapting any subset of them count)."""
    base = next((b for b in reg.bases() if b.name == base_model), None)
    if base is None:
        raise KeyError(f"base model {base_model!r} is not registered in {reg.root}")
    return [LayerSpec(name, d, k) for name, (d, k) in base.layer_shapes.items()]


def zero_filled(lora, layers: list[LayerSpec]) -> dict:
    """``lora`` over exactly ``layers``, a missing one as rank-1 zero factors: how a LoRA that
    leaves layers out must be given to the authors' design, which requires every layer."""
    import torch

    full = {spec.name: lora[spec.name] for spec in layers if spec.name in lora}
    for spec in layers:
        full.setdefault(spec.name, (torch.zeros(1, spec.d_in), torch.zeros(spec.d_out, 1)))
    return full


def base_probes(source: str, layers: list[LayerSpec], probes: int, texts: list[str],
                n_prompts: int = 32) -> dict:
    """Per-layer probe directions from the base at ``source`` rendering up to ``n_prompts`` of the
    pool's texts (the first of each distinct one, in a fixed order), a few steps each."""
    from pipelines.activation_probes import activation_probes
    from pipelines.generate import load_base
    from pipelines.world.sampling import generate

    prompts = sorted(set(texts))[:n_prompts]
    pipe = load_base(source)
    names = [spec.name for spec in layers]
    return activation_probes(pipe.transformer, names, probes, lambda: generate(pipe, prompts, seed=0, steps=6))


def version_of(pool_ids: list[str], base_model: str, recipe: Recipe) -> str:
    """``enc-<hash>`` of the pool, the base model and the recipe."""
    fields = {k: v for k, v in recipe.__dict__.items() if v or k != "text_encoder"}  # ids made before it stay
    key = json.dumps({"pool": sorted(pool_ids), "base": base_model, "recipe": fields, "v": RECIPE_VERSION},
                     sort_keys=True)
    return f"enc-{recipe.design}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def train_pool_encoder(reg: Registry, base_model: str, where: str | None = None,
                       recipe: Recipe = Recipe(), progress: bool = False) -> tuple[LoRAWeightEncoder, dict]:
    """Train an encoder of ``recipe.design`` on the pool; returns it and its ``info`` (version,
    pool, loss curve, seconds) without registering it."""
    rows = pool_rows(reg, base_model, where)
    if len(rows) < 2:
        raise PoolError(f"the training pool has {len(rows)} LoRA(s) of {base_model!r}; contrastive "
                        "training needs at least 2")
    bases = reg.bases()
    items = [(load_canonical(reg.root / row["blob"], bases)[0].factors, lora_texts(row)) for row in rows]
    # a LoRA with no text of its own (a hashed file name, no card) still trains, against its name or
    # id as a text nothing else shares: its weights shape the space as one more instance. Leaving such
    # LoRAs out measured worse (20 of the demo's 60 training LoRAs stripped, seeds 0-3, held-out:
    # R@3 0.461 vs 0.480, R@10 0.716 vs 0.784, cosine gap 0.314 vs 0.361; only R@1 gained, 0.294 vs 0.230)
    items = [(lora, texts or [row["lora_id"]]) for (lora, texts), row in zip(items, rows)]
    config, layers = DESIGNS[recipe.design](), layer_specs(reg, base_model)
    spec = text_encoder_spec(recipe)
    text_encoder = text_encoder_for(spec)
    if text_encoder.dim != config.embed_dim:  # stored vectors keep their width: a learned map
        config = dataclasses.replace(config, text_dim=text_encoder.dim)
    probes = None
    if recipe.probes_from:
        # one probe per layer, its base's main input direction: measured on the demo world (held-out
        # R@3 / MRR / within - cross cosine, mean over seeds): learned probes 0.35 / 0.31 / 0.08 (3 seeds),
        # 4 input directions 0.44 / 0.37 / 0.25 (3 seeds), 1 direction 0.49 / 0.40 / 0.33 (2 seeds)
        config = dataclasses.replace(config, **PROBED)
        probes = base_probes(recipe.probes_from, layers, config.probes, [t for _, texts in items for t in texts])
    if config.require_all_layers:  # the authors' design: a fixed list of layers, every one present
        adapted = set().union(*(lora.keys() for lora, _ in items))
        layers = [spec for spec in layers if spec.name in adapted]
        items = [(zero_filled(lora, layers), texts) for lora, texts in items]
    views = PROBED_VIEWS if probes is not None else 1
    start = time.perf_counter()
    encoder, losses = train_encoder(items, text_encoder, config, steps=recipe.steps,
                                    batch_size=recipe.batch_size, seed=recipe.seed,
                                    lr=recipe.lr or (PROBED_LR if probes is not None else LR),
                                    progress=progress, layers=layers, probes=probes, views=views)
    ids = [row["lora_id"] for row in rows]
    info = {"version": version_of(ids, base_model, recipe), "base_model": base_model, "pool": ids,
            "pool_size": len(ids), "where": where or "", "recipe": recipe.__dict__, "text_encoder": spec,
            "views": views, "loss_first": losses[0], "loss_last": losses[-1], "losses": [round(x, 4) for x in losses],
            "seconds": round(time.perf_counter() - start, 2)}
    return encoder, info


def active_encoder(reg: Registry, base_model: str):
    """``base_model``'s active encoder version record, or None."""
    return next((r for r in reg.encoder_versions() if r.active and r.base_model == base_model), None)


def recorded_setup(record) -> tuple[str, dict]:
    """The where filter ("" for every LoRA) and recipe fields an encoder ``record`` was trained
    with (``""`` and ``{}`` for None)."""
    info = record.info if record else {}
    recipe = {k: v for k, v in (info.get("recipe") or {}).items() if k in Recipe.__dataclass_fields__}
    return str(info.get("where") or ""), recipe


def active_recipe(reg: Registry, base_model: str, where: str | None = None,
                  **fields: object) -> tuple[str, Recipe]:
    """``where`` and the :class:`Recipe` of ``fields``, each one left None (``where`` too) taken from
    ``base_model``'s active encoder (its where filter and recorded recipe; without one, every LoRA of
    the base and the Recipe default), so that all None re-makes the active version."""
    active_where, recipe = recorded_setup(active_encoder(reg, base_model))
    given = {name: value for name, value in fields.items() if value is not None}
    return active_where if where is None else where, Recipe(**{**recipe, **given})


def train_registry_encoder(reg: Registry, base_model: str, where: str | None = None,
                           recipe: Recipe = Recipe(), activate: bool = True, progress: bool = False) -> dict:
    """Train (unless this pool's version is registered already), register and, with
    ``activate``, embed every LoRA of the base with it and switch search to it. Returns the info
    with ``trained`` (False when cached) and the embedding report; a pool that cannot be trained
    on is a :class:`PoolError`."""
    ids = [row["lora_id"] for row in pool_rows(reg, base_model, where)]
    version = version_of(ids, base_model, recipe)
    known = {r.version: r for r in reg.encoder_versions()}
    if version in known:
        info = dict(known[version].info, trained=False)
        if activate and not known[version].active:
            info["embedding"] = reg.register_encoder(known[version].path).to_dict()
        else:
            info["embedding"] = reg.refresh_embeddings().to_dict()
        return info
    encoder, info = train_pool_encoder(reg, base_model, where, recipe, progress)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{info['version']}.safetensors"
        encoder.save(path, info["version"], info)
        report = reg.register_encoder(path, activate=activate)
    return dict(info, trained=True, embedding=report.to_dict())
