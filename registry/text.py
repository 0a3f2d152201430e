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

import re
import threading

import numpy as np

from models.torch_threads import one_torch_thread

MAX_TEXTS = 64  # lines embedded one by one per document; the rest share one last text (cost bound)
LINES_KEPT = 8192  # line vectors this process keeps (~12 MB): tags shared across a folder's batches
_ONE_THREAD_BELOW = 64  # a few short texts: OpenMP barriers cost more than they give
# A line that names nothing: a hash or id (8+ hex digits, at least one a digit, dashes and
# underscores aside), only digits and punctuation, or a trainer's default output name (diffusers'
# pytorch_lora_weights, PEFT's adapter_model, kohya's last / last-000010).
_NAMES_NOTHING = re.compile(
    r"(?=[a-f_-]*\d)[0-9a-f_-]{8,}|[\W\d_]*"
    r"|(pytorch_lora_weights|adapter_model|diffusion_pytorch_model|last)([-_.]?\d+)?", re.IGNORECASE)


def names_something(line: str) -> bool:
    """Whether a line of a search document can describe a LoRA (see :data:`_NAMES_NOTHING`)."""
    return not _NAMES_NOTHING.fullmatch(line.strip())


def document_texts(document: str) -> list[str]:
    """The distinct non-empty lines of ``document`` that name something, at most :data:`MAX_TEXTS`:
    lines beyond go, joined, into the last one; none for a LoRA known only by its file's hash."""
    lines = list(dict.fromkeys(line.strip() for line in document.splitlines() if names_something(line)))
    if len(lines) > MAX_TEXTS:
        lines[MAX_TEXTS - 1:] = [" ".join(lines[MAX_TEXTS - 1:])]
    return lines


def embed_documents(documents: list[str]) -> list[list[float] | None]:
    """The text vector of each search document: the unit mean of its lines' vectors
    (:func:`document_texts`), each distinct line of the documents embedded once, in one batch; ``None`` for a
    document with no line that names something (a LoRA known only by a hashed or default file name,
    with no card or prompt): its text would match queries by noise alone, so it stays out of the
    text vector's list, and hybrid search finds it by its weights (in the demo's no-metadata
    evaluation, ranking such names by their vectors cost hybrid 0.08 of Recall@3 against weights
    alone). Full-text search still finds it by name."""
    texts = [document_texts(d) for d in documents]
    # a line many documents share (a tag, a base model's name) is embedded once: a batch of 64
    # kohya-tagged LoRAs (33 lines each, 262 distinct of 2,112) took 6.3 s, its distinct lines 0.9 s
    vectors = _line_vectors(list(dict.fromkeys(t for lines in texts for t in lines)))
    out = []
    for lines in texts:
        if not lines:
            out.append(None)
            continue
        mean = np.mean([vectors[t] for t in lines], axis=0)
        norm = float(np.linalg.norm(mean))
        out.append((mean / norm if norm > 0 else mean).tolist())
    return out


_kept: dict[str, np.ndarray] = {}  # line -> vector, least recently used first
_kept_for: object = None  # the text encoder that made them
_kept_lock = threading.Lock()


def forget_line_vectors() -> None:
    """Drop the line vectors this process kept (a benchmark's next add then meets its LoRA's lines
    for the first time, as a new LoRA's would be)."""
    with _kept_lock:
        _kept.clear()


def _line_vectors(lines: list[str]) -> dict[str, np.ndarray]:
    """The vector of each distinct line. The last :data:`LINES_KEPT` lines this process used are
    kept, so the tags a folder's LoRAs share are embedded once per ingest, not once per batch of
    rows, nor once per file whose vector is made beside its blob copy. Written by hand: the cache
    must take and give whole batches, which ``functools.lru_cache`` does not."""
    global _kept_for
    if not lines:
        return {}
    from models.text_encoder import default_text_encoder

    encoder = default_text_encoder()
    with _kept_lock:
        if encoder is not _kept_for:
            _kept.clear()
            _kept_for = encoder
        found = {line: _kept.pop(line) for line in lines if line in _kept}
        _kept.update(found)  # now the most recently used
    missing = [line for line in lines if line not in found]
    for line, vector in zip(missing, _encode(missing) if missing else []):
        found[line] = vector.copy()  # a row of its own, not a view keeping the whole batch alive
    with _kept_lock:
        if encoder is _kept_for:
            _kept.update((line, found[line]) for line in missing)
            while len(_kept) > LINES_KEPT:
                del _kept[next(iter(_kept))]
    return found


def _encode(texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    from models.text_encoder import default_text_encoder

    if len(texts) < _ONE_THREAD_BELOW:
        with one_torch_thread():
            return default_text_encoder().encode(texts)
    return default_text_encoder().encode(texts)
