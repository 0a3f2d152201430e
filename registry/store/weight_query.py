"""The weight channel's query vectors for an encoder trained against another text encoder than
the default (a pipeline's CLIP, say): the prompt through that text encoder, then through the
encoder's learned text map (``text_proj.weight`` in its checkpoint, read with numpy: no torch for
the map itself), L2-normalised. Encoders trained against the default need none of this: their
weight list is searched with the vector every channel shares."""

from __future__ import annotations

import functools
import json
import os
import re

import numpy as np

TEXT_MAP = "text_proj.weight"  # models.encoder.LoRAWeightEncoder.text_proj's state-dict key
_NAMED_TEXT_ENCODER = re.compile(r'"text_encoder": "[^"]')


def text_encoder_of(info: str | None) -> str:
    """The text encoder an encoder's info names ("": the default). Its info holds the ids of its
    whole training pool (MBs at 100k LoRAs), so it is parsed only when it names another one."""
    if not info or not _NAMED_TEXT_ENCODER.search(info):
        return ""
    return json.loads(info).get("text_encoder", "")


@functools.lru_cache(maxsize=8)
def _text_map(path: str, size: int, mtime_ns: int) -> np.ndarray | None:  # size, mtime: a new file is read again
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        return f.get_tensor(TEXT_MAP).astype(np.float32) if TEXT_MAP in f.keys() else None


def query_vectors(text_encoder: str, checkpoint: str | os.PathLike, texts: list[str]) -> np.ndarray:
    """``texts`` embedded for the weight list of the encoder at ``checkpoint``, trained against
    ``text_encoder`` (its recorded spec; see :func:`models.text_encoder.text_encoder_for`)."""
    from models.text_encoder import text_encoder_for

    vectors = text_encoder_for(text_encoder).encode(list(texts)).astype(np.float32)
    st = os.stat(checkpoint)
    text_map = _text_map(os.path.realpath(checkpoint), st.st_size, st.st_mtime_ns)
    if text_map is not None:
        vectors = vectors @ text_map.T
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors
