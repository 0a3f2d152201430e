"""When a base model's LoRA-weight encoder is due for retraining: its training pool grew enough.

New LoRAs are searchable the moment they are ingested (embedded zero-shot by the active encoder),
so retraining is about quality, not coverage, and costs minutes: it is worth it once the pool has
grown by a share of what the active encoder saw (default 20 %, at least 8 new LoRAs). The pool is
the one the active encoder was trained on: its base model and its ``where`` filter (the demo trains
on the world's training folder only, so held-out arrivals never count). A base with LoRAs but no
encoder is due once it holds ``first_pool`` LoRAs. The retrained encoder keeps the active one's
recipe (design, steps, seed, probes, text encoder), so the only change is the data.

The fusion gates of a base pipeline trained on the registry (``pipelines.registry_gates``) follow
the same thresholds (:func:`gate_pool_growth`): their pool is the base model's LoRAs with sample
renders, against the pool of the newest gates for that base; a base without gates gets its first
ones at ``GATES_FIRST_POOL`` such LoRAs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing the encoder (torch) and LanceDB waits for the first check
    from registry import Registry

MIN_GROWTH = 0.2  # retrain once the pool grew by this share of the active encoder's pool ...
MIN_NEW = 8  # ... and by at least this many LoRAs
FIRST_POOL = 16  # a base without an encoder gets one once it holds this many LoRAs


@dataclass(frozen=True)
class PoolGrowth:
    """How a base model's training pool stands against its active encoder."""

    base_model: str
    pool_size: int  # LoRAs in the pool now (not removed, matching ``where``)
    new: int  # of those, LoRAs the active encoder was not trained on
    trained_on: int | None  # the active encoder's pool size; None: the base has no active encoder
    active_version: str | None
    where: str = ""  # the pool's SQL filter (the active encoder's), "" for every LoRA of the base
    recipe: dict = field(default_factory=dict)  # the active encoder's recipe fields ({} without one)
    next_version: str = ""  # the version a retraining on this pool would make

    def due(self, min_growth: float = MIN_GROWTH, min_new: int = MIN_NEW, first_pool: int = FIRST_POOL) -> bool:
        """Whether a retraining (or a first training) is worth running now."""
        if self.trained_on is None:
            return self.pool_size >= first_pool
        return self.new >= max(min_new, math.ceil(min_growth * self.trained_on))

    def reason(self, min_growth: float = MIN_GROWTH, min_new: int = MIN_NEW, first_pool: int = FIRST_POOL) -> str:
        """One line saying why it is (or is not) due."""
        if self.trained_on is None:
            return (f"{self.base_model}: no encoder yet, {self.pool_size} LoRA(s) in the pool "
                    f"({'≥' if self.due(min_growth, min_new, first_pool) else '<'} {first_pool} to train a first one)")
        needed = max(min_new, math.ceil(min_growth * self.trained_on))
        return (f"{self.base_model}: {self.new} new LoRA(s) since encoder {self.active_version} "
                f"(trained on {self.trained_on}; retrain at {needed})")


def pool_growth(reg: Registry, base_model: str) -> PoolGrowth:
    """The pool of ``base_model`` now, against the ids its active encoder was trained on."""
    from pipelines.encoder_pool import Recipe, active_encoder, pool_condition, recorded_setup, version_of

    active = active_encoder(reg, base_model)
    where, recipe = recorded_setup(active)
    condition = pool_condition(base_model, where or None)
    n = reg.loras.count_rows(condition)
    ids = sorted(r["lora_id"] for r in reg.rows(reg.loras, condition, n, ["lora_id"])) if n else []
    trained = set((active.info if active else {}).get("pool") or [])
    return PoolGrowth(base_model=base_model, pool_size=len(ids), new=len(set(ids) - trained) if active else len(ids),
                      trained_on=len(trained) if active else None, active_version=active.version if active else None,
                      where=where, recipe=recipe, next_version=version_of(ids, base_model, Recipe(**recipe)))


def growth_by_base(reg: Registry) -> list[PoolGrowth]:
    """:func:`pool_growth` of every known base model that has LoRAs (an encoder needs the base's
    layer shapes: LoRAs of an unknown base are left out), by name."""
    known = {b.name for b in reg.bases()}
    bases = {r["base_model"] for r in reg.column_rows(reg.loras, ["base_model"])} & known
    return [pool_growth(reg, base) for base in sorted(bases)]


# Gates (``pipelines.registry_gates``) belong to one base pipeline and train on the LoRAs of its base
# model that have sample renders; they are retrained at the encoder's thresholds. A base without
# gates gets its first ones as soon as training is possible: gated fusion without gates runs untrained
# ones (plain addition), any trained gates beat that, training only the gates is cheap, and two is
# what ``train_registry_gates`` needs (a target and an interference LoRA), so the sensor never asks
# for a run that must fail for want of LoRAs, and the first retraining follows at ``MIN_NEW`` more.
GATES_FIRST_POOL = 2


@dataclass(frozen=True)
class GatePoolGrowth(PoolGrowth):
    """How the gate-training pool of a base pipeline stands against its newest gates.

    ``pool_size``/``new`` count LoRAs with at least one sample render pair; ``trained_on``/
    ``active_version``: the newest gates' pool size and version (None: no gates yet);
    ``recipe``: their recipe; ``next_version``: a hash of the base and the pool's ids."""

    base: str = ""  # the base pipeline as resolved (``pipelines.generate.resolve_base``)
    size: int = 0  # the newest gates' training image size (0: none yet)
    without_renders: int = 0  # LoRAs of the base matching ``where`` that have no render pair

    def due(self, min_growth: float = MIN_GROWTH, min_new: int = MIN_NEW, first_pool: int = GATES_FIRST_POOL) -> bool:
        """Whether training gates (first ones, or again on the grown pool) is worth running now."""
        return super().due(min_growth, min_new, first_pool)

    def reason(self, min_growth: float = MIN_GROWTH, min_new: int = MIN_NEW,
               first_pool: int = GATES_FIRST_POOL) -> str:
        """One line saying why it is (or is not) due."""
        bare = f"; {self.without_renders} without sample renders do not count" if self.without_renders else ""
        if self.trained_on is None:
            return (f"{self.base_model}: no gates for {self.base} yet, {self.pool_size} LoRA(s) with sample renders "
                    f"({'≥' if self.due(min_growth, min_new, first_pool) else '<'} {first_pool} to train the first "
                    f"ones){bare}")
        needed = max(min_new, math.ceil(min_growth * self.trained_on))
        return (f"{self.base_model}: {self.new} new LoRA(s) with sample renders since gates {self.active_version} "
                f"(trained on {self.trained_on}; retrain at {needed}){bare}")


def gate_pool_hash(base: str, base_model: str, ids: list[str]) -> str:
    """A short id of a gate-training pool: the base pipeline, its base model and the LoRA ids."""
    import hashlib
    import json

    payload = json.dumps({"base": base, "base_model": base_model, "pool": sorted(ids)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def gate_pool_growth(reg: Registry, base: str, base_model: str | None = None,
                     where: str | None = None) -> GatePoolGrowth:
    """The LoRAs of ``base_model`` (default: the only base the registry's LoRAs have) matching
    ``where`` that have a sample render pair, against the pool of the newest gates for the base
    pipeline ``base`` (folder, demo world or Hub id). Cheap: render files are checked, not read.
    An unknown base model, bad SQL or an unresolvable base is a ValueError / ``BaseNotFound``."""
    from pipelines.encoder_pool import pool_condition
    from pipelines.generate import resolve_base
    from pipelines.registry_gates import count_pool, newest_gates, only_base_with_loras, render_pairs
    from pipelines.train_gates import GateRecipe

    source = resolve_base(base)
    base_model = base_model or only_base_with_loras(reg)
    n = count_pool(reg, base_model, where)
    rows = reg.rows(reg.loras, pool_condition(base_model, where), n,
                    ["lora_id", "render_prompts", "render_blobs", "captions"])
    ids = sorted(r["lora_id"] for r in rows if render_pairs(reg, r))
    newest = newest_gates(reg, source, base_model)
    _, version, meta = newest if newest else (None, None, {})
    trained = set(meta.get("pool") or [])
    recipe = {k: v for k, v in (meta.get("recipe") or {}).items() if k in GateRecipe.__dataclass_fields__}
    size = str(meta.get("base", "")).rsplit("|", 1)[-1].removesuffix("px")
    return GatePoolGrowth(base_model=base_model, pool_size=len(ids), new=len(set(ids) - trained),
                          trained_on=len(trained) if newest else None, active_version=version,
                          where=where or "", recipe=recipe, next_version=gate_pool_hash(source, base_model, ids),
                          base=source, size=int(size) if size.isdigit() else 0, without_renders=len(rows) - len(ids))
