"""The generation report's anchor: retrieval as the authors design it, by their weight-only
LoRA encoder (trained on exactly our encoder's pool, the one the retrieval report evaluates),
ranking every LoRA of the registry's base by the cosine of its weight embedding with the
prompt's text embedding. The hits are then fused by ``gated`` like ours."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.encoder import LoRAWeightEncoder
from pipelines.evaluate.retrieval import paper_design_encoder, weight_query_embedder
from pipelines.evaluate.retrieval_baselines import paper_embeddings
from registry.lora.inspect import load_canonical
from registry.store.search import NOT_REMOVED
from registry.store.store import quote

_BATCH = 64


@dataclass(frozen=True)
class AnchorHit:
    """One LoRA the authors' retrieval returns (what ``Generator`` needs of a hit)."""

    lora_id: str
    trigger_words: list[str]


class AnchorRetrieval:
    """The authors' weight-only retrieval over the registry (embeddings made once)."""

    def __init__(self, registry, active, progress: bool = False) -> None:
        record, self.encoder = paper_design_encoder(registry, active, progress)
        paper = LoRAWeightEncoder.load(record.path)
        where = f"base_model = {quote(active.base_model)} AND {NOT_REMOVED}"
        rows = registry.rows(registry.loras, where, max(registry.loras.count_rows(where), 1),
                             ["lora_id", "blob", "trigger_words"])
        self.ids = [r["lora_id"] for r in rows]
        self.triggers = [list(r["trigger_words"] or []) for r in rows]
        bases = registry.bases()
        parts = [paper_embeddings(paper, [load_canonical(registry.root / r["blob"], bases)[0].factors
                                          for r in rows[i:i + _BATCH]]) for i in range(0, len(rows), _BATCH)]
        emb = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
        self.embeddings = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        self.embed_queries = weight_query_embedder(record)

    def retrieve(self, prompt: str, k: int) -> list[AnchorHit]:
        """The ``k`` LoRAs whose weight embeddings are nearest the prompt's."""
        query = self.embed_queries([prompt])[0]
        order = np.argsort(-(self.embeddings @ (query / max(np.linalg.norm(query), 1e-12))), kind="stable")[:k]
        return [AnchorHit(self.ids[i], self.triggers[i]) for i in order]
