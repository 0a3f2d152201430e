"""Text vectors of search documents, with the default text encoder (ingest, captions and search
share it, so stored and query vectors come from the same model).

A search document has one text per line (name, trigger words, description, each tag, each
render prompt, each caption). Its vector is the normalised mean of its distinct lines' vectors,
not the vector of the whole document in one pass: the text encoder reads at most 256 tokens (a
kohya tag list fills them before the prompts and captions are reached), and one pass over a
long list of scenes lands near none of them. The mean keeps what a LoRA's texts share, its
theme, which is also what the weight encoder is trained to predict from each text. Measured on
the demo registry (51 held-out queries, ``eval retrieval``): text R@1 0.980 -> 1.000, hybrid
0.941 -> 0.980; over the whole registry hybrid R@3 0.941 -> 1.000.
"""

from __future__ import annotations

import numpy as np

from models.torch_threads import one_torch_thread

MAX_TEXTS = 64  # lines embedded one by one per document; the rest share one last text (cost bound)
_ONE_THREAD_BELOW = 64  # a few short texts: OpenMP barriers cost more than they give


def document_texts(document: str) -> list[str]:
    """The distinct non-empty lines of ``document`` (``[document]`` if it has none), at most
    :data:`MAX_TEXTS`: lines beyond go, joined, into the last one."""
    lines = list(dict.fromkeys(line.strip() for line in document.splitlines() if line.strip()))
    if not lines:
        return [document]
    if len(lines) > MAX_TEXTS:
        lines[MAX_TEXTS - 1:] = [" ".join(lines[MAX_TEXTS - 1:])]
    return lines


def embed_documents(documents: list[str]) -> list[list[float]]:
    """The text vector of each search document: the unit mean of its lines' vectors
    (:func:`document_texts`), every line of every document embedded in one batch."""
    texts = [document_texts(d) for d in documents]
    vectors = _encode([t for lines in texts for t in lines])
    out, start = [], 0
    for lines in texts:
        mean = vectors[start:start + len(lines)].mean(axis=0)
        start += len(lines)
        norm = float(np.linalg.norm(mean))
        out.append((mean / norm if norm > 0 else mean).tolist())
    return out


def _encode(texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    from models.text_encoder import default_text_encoder

    if len(texts) < _ONE_THREAD_BELOW:
        with one_torch_thread():
            return default_text_encoder().encode(texts)
    return default_text_encoder().encode(texts)
