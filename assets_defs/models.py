"""Model assets: the LoRA-weight encoder (trained on the registry's pool) and the weight
embeddings of every LoRA (incremental)."""

import base64
import io

import dagster as dg
from pydantic import Field

from assets_defs.ingest import ingested_loras
from assets_defs.maintenance import AFTER_ARRIVALS
from assets_defs.resources import RegistryResource
from assets_defs.sources import synced_loras


class EncoderTrainingConfig(dg.Config):
    """Which LoRAs train the encoder, and how: a field left null is the base's active encoder's (its
    where filter and recorded recipe; the default recipe when the base has none), so the defaults
    re-make the active version: a cache hit while its pool is unchanged."""

    base_model: str = Field("autolora-demo-flux", description="the base whose LoRAs train (and use) the encoder")
    where: str | None = Field(None, description="a LanceDB SQL filter narrowing the pool; empty: every LoRA of the "
                                                "base; null: the active encoder's (every LoRA without one)")
    design: str | None = Field(None, description="'ours' or 'paper' (the authors' design); null: the active "
                                                 "encoder's ('ours' without one)")
    steps: int | None = Field(None, description="optimiser steps; null: the active encoder's (300 without one)")
    batch_size: int | None = Field(None, description="LoRAs per contrastive batch; null: the active encoder's "
                                                     "(32 without one)")
    lr: float | None = Field(None, description="learning rate; null: the active encoder's (the design's own "
                                               "without one)")
    seed: int | None = Field(None, description="random seed of the training; null: the active encoder's "
                                               "(0 without one)")
    probes_from: str | None = Field(None, description="the base as a diffusers pipeline (folder or Hub id): probes "
                                                      "from its layers' real inputs; empty: learned probes; null: "
                                                      "the active encoder's (learned probes without one)")
    text_encoder: str | None = Field(None, description="'clip': the probes_from pipeline's CLIP text encoder; "
                                                       "'clip:PIPELINE'; a sentence-transformers model; empty: "
                                                       "all-MiniLM-L6-v2; null: the active encoder's (empty "
                                                       "without one)")


def _loss_plot(losses: list[float]) -> str:
    """The loss curve as markdown with an embedded PNG (Dagster 1.13 has no image metadata)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(losses)
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return f"![loss](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


@dg.asset(group_name="models", kinds={"pytorch"}, deps=[ingested_loras], pool="registry_writes")
def lora_weight_encoder(context: dg.AssetExecutionContext, config: EncoderTrainingConfig,
                        registry: RegistryResource) -> dg.MaterializeResult:
    """The LoRA-weight encoder trained contrastively on the pool (skipped while the pool is
    unchanged; by default the active encoder's pool and recipe); registering a new version embeds
    every LoRA with it and switches search to it."""
    from pipelines.encoder_pool import PoolError, Recipe, active_recipe, train_registry_encoder

    reg = registry.open()
    fields = {name: getattr(config, name) for name in Recipe.__dataclass_fields__}
    where, recipe = active_recipe(reg, config.base_model, config.where, **fields)
    try:
        info = train_registry_encoder(reg, config.base_model, where or None, recipe)
    except PoolError as error:  # bad input: retrying cannot help
        raise dg.Failure(str(error), allow_retries=False) from None
    context.log.info(f"encoder {info['version']}: {'trained' if info['trained'] else 'cached'} "
                     f"(where {where!r}, {recipe})")
    return dg.MaterializeResult(metadata={
        "version": info["version"], "pool_size": info["pool_size"], "trained": info["trained"],
        "where": where, "recipe": dg.MetadataValue.json(recipe.__dict__),
        "seconds": info.get("seconds", 0.0), "loss_first": info.get("loss_first", 0.0),
        "loss_last": info.get("loss_last", 0.0),
        "loss_curve": dg.MetadataValue.md(_loss_plot(info["losses"]) if info.get("losses") else "cached"),
        "embedded": dg.MetadataValue.json(info["embedding"]),
    })


@dg.asset(group_name="models", kinds={"lancedb"}, deps=[lora_weight_encoder, ingested_loras, synced_loras],
          pool="registry_writes", automation_condition=AFTER_ARRIVALS)
def weight_embeddings(context: dg.AssetExecutionContext, registry: RegistryResource) -> dg.MaterializeResult:
    """Every LoRA's weight vector from its base's active encoder: only rows that lack it (new or
    changed LoRAs; all rows once the encoder version changed)."""
    report = registry.open().refresh_embeddings()
    for failure in report.failed:
        context.log.warning(f"could not embed {failure['lora_id']}: {failure['reason']}")
    return dg.MaterializeResult(metadata={"embedded": dg.MetadataValue.json(report.embedded),
                                          "failed": len(report.failed)})
