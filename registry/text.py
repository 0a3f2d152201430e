"""Text vectors of search documents, with the default text encoder (ingest, captions and search
share it, so stored and query vectors come from the same model)."""

from __future__ import annotations

from models.torch_threads import one_torch_thread


def embed_texts(texts: list[str]) -> list[list[float]]:
    """Text vectors of ``texts`` with the default encoder."""
    if not texts:
        return []
    from models.text_encoder import default_text_encoder

    with one_torch_thread():  # a few short texts: OpenMP barriers cost more than they give
        return [v.tolist() for v in default_text_encoder().encode(texts)]
