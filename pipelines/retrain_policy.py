"""When a base model's LoRA-weight encoder is due for retraining: its training pool grew enough.

New LoRAs are searchable the moment they are ingested (embedded zero-shot by the active encoder),
so retraining is about quality, not coverage, and costs minutes: it is worth it once the pool has
grown by a share of what the active encoder saw (default 20 %, at least 8 new LoRAs). The pool is
the one the active encoder was trained on: its base model and its ``where`` filter (the demo trains
on the world's training folder only, so held-out arrivals never count). A base with LoRAs but no
encoder is due once it holds ``first_pool`` LoRAs. The retrained encoder keeps the active one's
recipe (design, steps, seed, probes, text encoder), so the only change is the data.
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
    from pipelines.encoder_pool import Recipe, pool_condition, version_of

    active = next((r for r in reg.encoder_versions() if r.active and r.base_model == base_model), None)
    info = active.info if active else {}
    where = str(info.get("where") or "")
    condition = pool_condition(base_model, where or None)
    n = reg.loras.count_rows(condition)
    ids = sorted(r["lora_id"] for r in reg.rows(reg.loras, condition, n, ["lora_id"])) if n else []
    recipe = {k: v for k, v in (info.get("recipe") or {}).items() if k in Recipe.__dataclass_fields__}
    trained = set(info.get("pool") or [])
    return PoolGrowth(base_model=base_model, pool_size=len(ids), new=len(set(ids) - trained) if active else len(ids),
                      trained_on=len(trained) if active else None, active_version=active.version if active else None,
                      where=where, recipe=recipe, next_version=version_of(ids, base_model, Recipe(**recipe)))


def growth_by_base(reg: Registry) -> list[PoolGrowth]:
    """:func:`pool_growth` of every known base model that has LoRAs (an encoder needs the base's
    layer shapes: LoRAs of an unknown base are left out), by name."""
    known = {b.name for b in reg.bases()}
    bases = {r["base_model"] for r in reg.column_rows(reg.loras, ["base_model"])} & known
    return [pool_growth(reg, base) for base in sorted(bases)]
