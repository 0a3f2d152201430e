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
    """Which LoRAs train the encoder, and how."""

    base_model: str = Field("autolora-demo-flux", description="the base whose LoRAs train (and use) the encoder")
    where: str = Field("", description="a LanceDB SQL filter narrowing the pool; empty: every LoRA of the base")
    design: str = Field("ours", description="'ours' or 'paper' (the authors' design)")
    steps: int = Field(300, description="optimiser steps")
    batch_size: int = Field(32, description="LoRAs per contrastive batch")
    lr: float | None = Field(None, description="learning rate; null: the design's own")
    seed: int = Field(0, description="random seed of the training")
    probes_from: str = Field("", description="the base as a diffusers pipeline (folder or Hub id): probes from "
                                             "its layers' real inputs; empty: learned probes")
    text_encoder: str = Field("", description="'clip': the probes_from pipeline's CLIP text encoder; "
                                              "'clip:PIPELINE'; a sentence-transformers model; empty: all-MiniLM-L6-v2")


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
    unchanged); registering a new version embeds every LoRA with it and switches search to it."""
    from pipelines.encoder_pool import Recipe, train_registry_encoder

    recipe = Recipe(**{name: getattr(config, name) for name in Recipe.__dataclass_fields__})
    info = train_registry_encoder(registry.open(), config.base_model, config.where or None, recipe)
    context.log.info(f"encoder {info['version']}: {'trained' if info['trained'] else 'cached'}")
    return dg.MaterializeResult(metadata={
        "version": info["version"], "pool_size": info["pool_size"], "trained": info["trained"],
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
