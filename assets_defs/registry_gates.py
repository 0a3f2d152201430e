"""Fusion gates trained on the registry's own LoRAs for a real base pipeline: the ``registry_gates``
asset, and the ``gates_retrain_sensor`` (stopped by default) that retrains them when the pool of
LoRAs with sample renders grows (``pipelines.retrain_policy.gate_pool_growth``).

The checkpoints go to ``<registry>/gates`` (cached by version); ``autolora generate --registry R
--base B`` picks the newest for its base by itself. The base is ``$AUTOLORA_GATES_BASE`` (a pipeline
folder, demo world or Hub id), else the demo world when it is built.
"""

import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets_defs.captions import lora_captions
from assets_defs.generation import loss_curve_md
from assets_defs.ingest import ingested_loras
from assets_defs.resources import RegistryResource
from assets_defs.sources import synced_loras
from pipelines.retrain_policy import GATES_FIRST_POOL, MIN_GROWTH, MIN_NEW, GatePoolGrowth, gate_pool_growth

DEMO_WORLD = ".autolora/world/default-seed0"
NO_BASE = ("no base configured: set AUTOLORA_GATES_BASE{} to the base pipeline the gates are for: a diffusers "
           "pipeline folder, a built demo world or a Hub id")
# the recipe knobs the CLI offers for registry gates (``composite`` needs a demo world's themes), with
# ``pipelines.train_gates.GateRecipe``'s defaults (importing it here would load diffusers with the code location)
RECIPE_FIELDS = {"steps": 300, "lr": 1e-2, "hinge": 0.0, "time_features": 0, "seed": 0}


def default_gates_base() -> str:
    """``$AUTOLORA_GATES_BASE``, else the demo world when it is built, else "" (none)."""
    return os.environ.get("AUTOLORA_GATES_BASE") or (DEMO_WORLD if Path(DEMO_WORLD).is_dir() else "")


class RegistryGatesConfig(dg.Config):
    """Which base and LoRAs the gates are trained for, and the recipe knobs worth changing."""

    base: str = Field(default_gates_base(), description="the base pipeline the gates are for: a diffusers pipeline "
                                                        "folder, a built demo world or a Hub id "
                                                        "($AUTOLORA_GATES_BASE, else the demo world when built)")
    base_model: str = Field("", description="the registry's base model whose LoRAs train the gates; empty: the "
                                            "only base the registry's LoRAs have")
    where: str = Field("", description="a LanceDB SQL filter narrowing the pool; empty: every LoRA of the base "
                                       "model with a sample render")
    size: int = Field(0, description="training image size in pixels; 0: the base's render size")
    steps: int = Field(RECIPE_FIELDS["steps"], description="optimiser steps")
    lr: float = Field(RECIPE_FIELDS["lr"], description="learning rate of the gates")
    hinge: float = Field(RECIPE_FIELDS["hinge"], description="weight of the hinge term (0: eq. 10 only)")
    time_features: int = Field(RECIPE_FIELDS["time_features"],
                               description="> 0: timestep-conditioned gates with this many sinusoidal features")
    seed: int = Field(RECIPE_FIELDS["seed"], description="random seed of the training")


@dg.asset(group_name="models", kinds={"pytorch"}, deps=[ingested_loras, synced_loras, lora_captions])
def registry_gates(context: dg.AssetExecutionContext, config: RegistryGatesConfig,
                   registry: RegistryResource) -> dg.MaterializeResult:
    """Fusion gates for a real base trained on the registry's LoRAs with sample renders (cached by
    version in ``<registry>/gates``; the newest is the one generation uses for that base)."""
    if not config.base:
        raise dg.Failure(description=NO_BASE.format(" (or the run config's base)"), allow_retries=False)
    from pipelines.generate import BaseNotFound
    from pipelines.registry_gates import PoolTooSmall, train_registry_gates
    from pipelines.train_gates import GateRecipe
    from registry.store.store import RegistryNotFound

    recipe = GateRecipe(**{name: getattr(config, name) for name in RECIPE_FIELDS})
    every = max(1, config.steps // 10)

    def progress(step: int, loss: float) -> None:
        if step == 0 or (step + 1) % every == 0:
            context.log.info(f"step {step + 1}/{config.steps}: loss {loss:.4f}")

    try:
        result = train_registry_gates(registry.open_existing(), config.base, base_model=config.base_model or None,
                                      where=config.where or None, recipe=recipe, size=config.size or None,
                                      progress=progress)
    except PoolTooSmall as error:
        raise dg.Failure(description=str(error), allow_retries=False,
                         metadata={"skipped": len(error.skipped),
                                   "skipped_loras": dg.MetadataValue.json(error.skipped)}) from None
    except (BaseNotFound, RegistryNotFound, ValueError) as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None
    training, meta = result.training, result.training.gates.meta
    for lora_id, why in result.skipped.items():
        context.log.warning(f"skipped {lora_id}: {why}")
    context.log.info(f"gates {training.version} ({'cached' if training.cached else 'trained'}) at {training.path}")
    base, base_model, size = (str(meta.get("base", "")).split("|") + ["", "", ""])[:3]
    losses = training.losses
    return dg.MaterializeResult(metadata={
        "version": training.version, "path": str(training.path), "cached": training.cached,
        "base": base, "base_model": base_model, "size": int(size.removesuffix("px") or 0),
        "pool_size": len(result.pool), "pool": dg.MetadataValue.json(result.pool), "skipped": len(result.skipped),
        "skipped_loras": dg.MetadataValue.json(result.skipped),
        "loss_first": float(losses[0]) if losses else 0.0, "loss_last": float(losses[-1]) if losses else 0.0,
        "seconds": round(float(meta.get("seconds", 0.0)), 2),
        "loss_curve": dg.MetadataValue.md(loss_curve_md(losses)),
    })


gates_retrain_job = dg.define_asset_job("gates_retrain_job", selection=[registry_gates],
                                        description="retrain the registry's fusion gates of one base on its grown pool")


def gates_run_config(growth: GatePoolGrowth) -> dict:
    """The ``registry_gates`` run config that trains ``growth``'s pool with the newest gates' recipe
    knobs and image size (the asset's defaults when there are no gates yet)."""
    config = {"base": growth.base, "base_model": growth.base_model, "where": growth.where, "size": growth.size,
              **{k: v for k, v in growth.recipe.items() if k in RECIPE_FIELDS}}
    return {"ops": {"registry_gates": {"config": config}}}


def gates_sensor(base: str | None = None, base_model: str = "", where: str = "", min_growth: float = MIN_GROWTH,
                 min_new: int = MIN_NEW, first_pool: int = GATES_FIRST_POOL,
                 name: str = "gates_retrain_sensor") -> dg.SensorDefinition:
    """The sensor requesting a ``gates_retrain_job`` run when the pool of ``base`` (default, read at
    each tick: :func:`default_gates_base`) grew enough; its run key names the pool, so one pool is
    never requested twice."""

    @dg.sensor(name=name, job=gates_retrain_job, minimum_interval_seconds=600,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description=f"retrain the registry's fusion gates of a base ($AUTOLORA_GATES_BASE) once its LoRAs "
                           f"with sample renders grew by {min_growth:.0%} (at least {min_new} new; the first gates "
                           f"at {first_pool})")
    def _sensor(context: dg.SensorEvaluationContext, registry: RegistryResource) -> dg.SensorResult | dg.SkipReason:
        pipeline = base if base is not None else default_gates_base()
        if not pipeline:  # said before importing the pipeline code (diffusers)
            return dg.SkipReason(NO_BASE.format(""))
        from pipelines.generate import BaseNotFound
        from registry.store.store import RegistryNotFound

        try:
            growth = gate_pool_growth(registry.open_existing(), pipeline, base_model or None, where or None)
        except (BaseNotFound, RegistryNotFound, ValueError) as error:
            return dg.SkipReason(str(error))
        reason = growth.reason(min_growth, min_new, first_pool)
        if not growth.due(min_growth, min_new, first_pool):
            return dg.SkipReason(reason)
        return dg.SensorResult(run_requests=[dg.RunRequest(
            run_key=f"{growth.base_model}:{growth.next_version}", run_config=gates_run_config(growth),
            tags={"autolora/base_model": growth.base_model, "autolora/base": growth.base, "autolora/reason": reason})])

    return _sensor


gates_retrain_sensor = gates_sensor()
