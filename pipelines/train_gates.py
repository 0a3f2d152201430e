"""Interference-resistant training of the fusion gates (AutoLoRA eq. 10) on the training pool.

Each step samples a target LoRA and 1..``max_interference`` interference LoRAs from the pool; all
of them are active together (in a random order) with the global LoRA, and the flow-matching loss
is taken on the *target's* image–caption pairs only, so the gates learn to let each LoRA act
where its own concept is asked for and to keep the others from interfering.  Only the gates train
(``GatedFusion.prepare_training``); the base and the LoRAs are frozen.

``hinge > 0`` adds the term of the authors' later code: on the same target images and noise, the
loss under the interference LoRA's *caption* is pushed up, ``hinge · relu(margin − (L_cross − L))``.

Variants: ``anchor`` (off) pulls the gates back toward their init (plain addition) after
each step (decoupled, ``lr · anchor · (θ − θ₀)``); ``prompt_triggers`` (off) puts every active LoRA's
trigger in the target's captions (inference prompts carry them all); ``composite`` (default 1) is the share of
steps whose active set has disjoint theme attributes and whose batch is fresh images showing all of
them at once, captioned with every trigger (world pools only, others train eq. 10 alone: not in
the paper, which has each LoRA's own pairs only).  Measured on the default world: see the gates branch report.

``init="authors"`` starts from the authors' released gate initialisation instead of plain addition
(:meth:`models.fusion.gate.FusionGate.init_as_authors`); :data:`AUTHORS_RECIPE` (that, trained by eq. 10
alone, as the paper) trains the anchor row of the fusion report.

Checkpoints are safetensors named by a version id (hash of the base id, the pool's LoRA files and
the recipe), with the pool and the recipe in the metadata; an existing version is loaded, not
retrained.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from safetensors import safe_open
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.fusion import GatedFusion
from models.safetensors_bytes import to_bytes
from pipelines.fusion_methods.base import Lora
from pipelines.fusion_methods.gated import GateSet, fusion_layers
from pipelines.world.train_base import (
    encode_captions, encode_images, flow_matching_loss, scale_latents, training_scheduler,
)
from registry.atomic_write import write_atomically

GATES_FORMAT = "autolora-gates/1"
# bump when the training code changes what one recipe trains (part of the version id);
# 2: captions longer than the base's 32 text tokens are encoded whole (composite captions lost their last words)
TRAINING_VERSION = 2


@dataclass(frozen=True)
class GateRecipe:
    """Everything that decides the trained gates (part of the version id)."""

    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-2
    max_interference: int = 2
    use_global: bool = True
    rank_global: int = 4
    time_features: int = 0
    hinge: float = 0.0
    margin: float = 0.05
    seed: int = 0
    trigger_only: bool = False  # world pools: keep only captions that carry the theme by the trigger alone
    anchor: float = 0.0           # decoupled decay of the gates toward their init (plain addition) per step
    prompt_triggers: bool = False  # captions carry every active LoRA's trigger (as inference prompts do)
    composite: float = 1.0        # share of steps on images showing the whole (attribute-disjoint) active set
    init: str = "addition"        # "addition" (untrained = plain addition) or "authors" (their released init)


INITS = ("addition", "authors")
# the anchor's gates: the authors' initialisation, trained by eq. 10 alone (each LoRA's own pairs), as the paper
AUTHORS_RECIPE = GateRecipe(init="authors", composite=0.0)


@dataclass
class PoolLora:
    """One training-pool LoRA with the image–caption pairs of its concept."""

    lora_id: str
    layers: Lora
    images: np.ndarray      # (N, H, W, 3) uint8
    captions: list[str]
    digest: str             # content hash of the LoRA file (for the version id)
    trigger: str = ""       # its trigger word (``prompt_triggers``)
    theme: object = None    # its world ``Theme`` (``composite`` renders images of several at once)


@dataclass
class GateTraining:
    """The result: where the gates are, their version, and how training went."""

    path: Path
    gates: GateSet
    version: str
    cached: bool
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def gate_version(base_id: str, pool: Sequence[PoolLora], recipe: GateRecipe) -> str:
    """Hash of the base id, the pool (ids and file digests, order-free) and the recipe."""
    data = {p.lora_id: hashlib.sha256("\n".join(p.captions).encode()).hexdigest()[:16] for p in pool}
    fields = asdict(recipe)
    if fields["init"] == "addition":  # the field came later: gates trained before it keep their versions
        del fields["init"]
    payload = json.dumps({"base": base_id, "pool": sorted((p.lora_id, p.digest, data[p.lora_id]) for p in pool),
                          "recipe": fields, "format": GATES_FORMAT,
                          "training": TRAINING_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def save_gates(path: str | Path, gates: GateSet) -> Path:
    """Write ``gates`` as safetensors; settings, version and ``meta`` (pool, recipe, losses) in the header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": GATES_FORMAT, "version": gates.version, "time_features": str(gates.time_features),
            "rank_global": str(gates.rank_global), "use_global": json.dumps(gates.use_global),
            "meta": json.dumps(gates.meta)}
    # written whole through a unique temp file with a plain file's mode (0o666 less the umask), as
    # every other checkpoint: safetensors' save_file would leave it 0600
    write_atomically(path, to_bytes({k: v.contiguous() for k, v in gates.state.items()}, metadata=meta))
    return path


def load_gates(path: str | Path) -> GateSet:
    """Read a gate checkpoint written by ``save_gates``."""
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
        if header.get("format") != GATES_FORMAT:
            raise ValueError(f"{path} is not an autolora gate checkpoint")
        state = {k: f.get_tensor(k) for k in f.keys()}
    return GateSet(state=state, time_features=int(header["time_features"]), rank_global=int(header["rank_global"]),
                   use_global=json.loads(header["use_global"]), version=header["version"],
                   meta=json.loads(header["meta"]))


class _Encoded:
    """A pool LoRA's latents and text conditioning, computed once."""

    def __init__(self, pipe: FluxPipeline, entry: PoolLora) -> None:
        self.x0 = scale_latents(pipe, encode_images(pipe, entry.images))
        self.text = encode_captions(pipe, entry.captions)


def _step_loss(pipe: FluxPipeline, target: _Encoded, other: _Encoded, recipe: GateRecipe,
               gen: torch.Generator, sched, text=None) -> torch.Tensor:
    """Eq. 10 on a batch of the target's pairs (``text``: its captions re-encoded, with ``idx``)."""
    idx = torch.randint(0, len(target.x0), (min(recipe.batch_size, len(target.x0)),), generator=gen)
    state = gen.get_state()
    if text is not None:
        tx = text(idx)
        embeds, pooled, ids = tx.prompt_embeds, tx.pooled, tx.text_ids
    else:
        embeds, pooled, ids = target.text.prompt_embeds[idx], target.text.pooled[idx], target.text.text_ids
    loss = flow_matching_loss(pipe, target.x0[idx], embeds, pooled, ids, gen, sched)
    if recipe.hinge <= 0:
        return loss
    cross = torch.randint(0, len(other.x0), (len(idx),), generator=gen)
    same_noise = torch.Generator().set_state(state)
    loss_cross = flow_matching_loss(pipe, target.x0[idx], other.text.prompt_embeds[cross],
                                    other.text.pooled[cross], other.text.text_ids, same_noise, sched)
    return loss + recipe.hinge * torch.relu(recipe.margin - (loss_cross - loss))


def _with_triggers(pipe: FluxPipeline, entry: PoolLora, others: Sequence[PoolLora], rng: np.random.Generator):
    """Captions of ``entry`` (by index) with the other active LoRAs' triggers in front, randomly ordered."""
    def text(idx: torch.Tensor):
        caps = []
        for i in idx.tolist():
            trig = [o.trigger for o in others] + [entry.trigger]
            rest = entry.captions[i][len(entry.trigger) + 2:] if entry.captions[i].startswith(entry.trigger) \
                else entry.captions[i]
            caps.append(", ".join([*(trig[j] for j in rng.permutation(len(trig))), rest]))
        return encode_captions(pipe, caps)
    return text


def _disjoint_set(pool: Sequence[PoolLora], target: int, n: int, rng: np.random.Generator) -> list[int]:
    """Up to ``n`` pool LoRAs besides ``target`` whose theme attributes clash with none of the set."""
    chosen, used = [], set(pool[target].theme.attrs)
    for i in rng.permutation(len(pool)):
        if len(chosen) == n:
            break
        keys = set(pool[int(i)].theme.attrs)
        if int(i) != target and not keys & used:
            chosen.append(int(i))
            used |= keys
    return chosen


def _composite_loss(pipe: FluxPipeline, entries: Sequence[PoolLora], recipe: GateRecipe,
                    rng: np.random.Generator, gen: torch.Generator, sched) -> torch.Tensor:
    from pipelines.world.themes import composite_images

    images, captions = composite_images([e.theme for e in entries], recipe.batch_size, rng)
    with torch.no_grad():
        x0 = scale_latents(pipe, encode_images(pipe, images))
        text = encode_captions(pipe, captions)
    return flow_matching_loss(pipe, x0, text.prompt_embeds, text.pooled, text.text_ids, gen, sched)


# cuDNN's attention backward returned NaN on a bfloat16 base (H200, torch 2.11, the demo base's 2 heads x 32):
# gate training leaves it out; the forward passes (generation) keep every backend
TRAINING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def train_gates(pipe: FluxPipeline, pool: Sequence[PoolLora], out_dir: str | Path, *, base_id: str,
                recipe: GateRecipe = GateRecipe(), progress: Callable[[int, float], None] | None = None,
                meta: dict | None = None) -> GateTraining:
    """Train (or load the cached) gates for ``pool`` on ``pipe``; the pipeline is left as found.
    ``meta``: more to record in the checkpoint's header (not part of its version)."""
    if len(pool) < 2:
        raise ValueError("gate training needs at least two pool LoRAs (a target and an interference)")
    if recipe.init not in INITS:
        raise ValueError(f"unknown gate init {recipe.init!r}; known: {', '.join(INITS)}")
    version = gate_version(base_id, pool, recipe)
    path = Path(out_dir) / f"gates-{version}.safetensors"
    if path.is_file():
        gates = load_gates(path)
        return GateTraining(path, gates, version, True, list(gates.meta.get("losses", [])))
    t0 = time.perf_counter()
    encoded = [_Encoded(pipe, p) for p in pool]
    rng = np.random.default_rng([recipe.seed, 0x6A7E])
    gen = torch.Generator().manual_seed(recipe.seed)
    sched = training_scheduler(pipe)
    tr = pipe.transformer
    grad_before = {n: p.requires_grad for n, p in tr.named_parameters()}
    # float32 gates whatever the base's precision: AdamW's small steps vanish in bfloat16 (w_o = 2 moves in 1/64s)
    fusion = GatedFusion(tr, fusion_layers(tr), time_features=recipe.time_features, gate_dtype=torch.float32)
    losses: list[float] = []
    try:
        fusion.prepare_training()
        if recipe.init == "authors":
            drawn = torch.Generator().manual_seed(recipe.seed)
            for layer in fusion.layers.values():
                layer.gate.init_as_authors(drawn)
        params = list(fusion.gate_parameters())
        init = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
        with_themes = recipe.composite > 0 and all(p.theme is not None for p in pool)  # else eq. 10 only
        with sdpa_kernel(TRAINING_ATTENTION):
            for step in range(recipe.steps):
                target = int(rng.integers(len(pool)))
                n_int = int(rng.integers(1, min(recipe.max_interference, len(pool) - 1) + 1))
                composite = with_themes and rng.random() < recipe.composite
                others = []
                if composite:
                    others = _disjoint_set(pool, target, n_int, rng)
                if not others:
                    others = [int(i) for i in rng.choice([i for i in range(len(pool)) if i != target], n_int,
                                                         replace=False)]
                active = [target, *others]
                rng.shuffle(active)
                fusion.set_loras([pool[i].layers for i in active], use_global=recipe.use_global,
                                 rank_global=recipe.rank_global)
                if composite:
                    loss = _composite_loss(pipe, [pool[i] for i in active], recipe, rng, gen, sched)
                else:
                    text = (_with_triggers(pipe, pool[target], [pool[i] for i in others], rng)
                            if recipe.prompt_triggers else None)
                    loss = _step_loss(pipe, encoded[target], encoded[others[0]], recipe, gen, sched, text)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if recipe.anchor > 0:
                    with torch.no_grad():
                        for p, p0 in zip(params, init):
                            p.sub_(recipe.lr * recipe.anchor * (p - p0))
                losses.append(loss.item())
                if progress is not None:
                    progress(step, losses[-1])
        state = {k: v.detach().clone() for k, v in fusion.gate_state_dict().items()}
    finally:
        fusion.detach()
        for n, p in tr.named_parameters():
            p.requires_grad_(grad_before.get(n, p.requires_grad))
    seconds = time.perf_counter() - t0
    gates = GateSet(state=state, time_features=recipe.time_features, rank_global=recipe.rank_global,
                    use_global=recipe.use_global, version=version,
                    meta={**(meta or {}), "base": base_id, "pool": sorted(p.lora_id for p in pool),
                          "recipe": asdict(recipe), "losses": losses, "seconds": seconds})
    save_gates(path, gates)
    return GateTraining(path, gates, version, False, losses, seconds)


def theme_of(entry: dict):
    """The ``Theme`` of a world manifest entry (to regenerate its image–caption pairs)."""
    from pipelines.world.themes import Theme

    return Theme(name=entry["theme"], attrs=dict(entry["attrs"]), words=tuple(entry["words"]),
                 trigger=entry["trigger"], split=entry["split"], synonym=bool(entry["synonym"]))


def world_pool(root: str | Path, split: str = "train", images_per_lora: int = 16, seed: int = 1000,
               trigger_only: bool = False) -> list[PoolLora]:
    """The ``split`` LoRAs of a built world (or its parent holding one) with fresh images of their
    themes (``theme_images``).

    ``trigger_only`` keeps the pairs whose caption leaves the theme's words out (the trigger alone
    carries the concept, as in the prompts fusion is used with); twice the images are drawn.
    """
    from pipelines.world.evaluate import resolve_world_root
    from pipelines.world.themes import theme_images
    from registry.lora.inspect import load_canonical

    root = resolve_world_root(root)
    manifest = json.loads((root / "world.json").read_text())
    pool = []
    for index, entry in enumerate(manifest["loras"]):
        if entry["split"] != split:
            continue
        file = root / entry["file"]
        theme = theme_of(entry)
        images, captions = theme_images(theme, images_per_lora * (2 if trigger_only else 1), seed + index)
        if trigger_only:
            keep = [i for i, c in enumerate(captions)
                    if not any(w in c[len(theme.trigger):] for w in theme.words)][:images_per_lora]
            keep = keep if len(keep) >= 2 else list(range(images_per_lora))
            images, captions = images[keep], [captions[i] for i in keep]
        pool.append(PoolLora(entry["theme"], load_canonical(file)[0].layers, images, captions,
                             hashlib.sha256(file.read_bytes()).hexdigest(), theme.trigger, theme))
    return pool


def train_world_gates(root: str | Path, out_dir: str | Path | None = None, recipe: GateRecipe = GateRecipe(),
                      progress: Callable[[int, float], None] | None = None) -> GateTraining:
    """Gates for a built world's training pool (``root``: the world or its parent holding one, see
    ``resolve_world_root``), cached in ``out_dir`` (default ``<world>/gates``)."""
    from models.torch_threads import one_torch_thread
    from pipelines.world.evaluate import resolve_world_root

    root = resolve_world_root(root)
    manifest = json.loads((root / "world.json").read_text())
    out = Path(out_dir) if out_dir is not None else root / "gates"
    pool = world_pool(root, trigger_only=recipe.trigger_only)
    version = gate_version(manifest["key"], pool, recipe)
    if (out / f"gates-{version}.safetensors").is_file():
        return train_gates(None, pool, out, base_id=manifest["key"], recipe=recipe)  # type: ignore[arg-type]
    pipe = FluxPipeline.from_pretrained(root / "base")
    pipe.set_progress_bar_config(disable=True)
    with one_torch_thread():
        return train_gates(pipe, pool, out, base_id=manifest["key"], recipe=recipe, progress=progress)
