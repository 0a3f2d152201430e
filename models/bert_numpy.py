"""A BERT sentence encoder (mean pooling, L2 normalisation) as a numpy forward pass.

Why hand-written: embedding one search prompt must not import torch. On the 2-core machine this
project targets, ``import torch`` alone takes ~3 s and sentence-transformers ~10 s, while a cold
``autolora search`` has 3 s in all (lancedb's own import takes 1.5-2 s of them). The model is
small (6 layers, width 384 for all-MiniLM-L6-v2), so a forward pass is a few matrix products:
numpy (BLAS) runs it in milliseconds, and the weights are read with ``safetensors`` and the
WordPiece tokenizer is the model's own ``tokenizer.json`` run by the ``tokenizers`` library, so
what is hand-written is only the layer arithmetic below. ``tests/models`` checks it against
sentence-transformers (cosine >= 0.9999 on every text, long texts truncated alike).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

_SQRT_HALF = np.float32(np.sqrt(0.5))
_WORD = "embeddings.word_embeddings.weight"
_ROWS_READ_ALONE = 256  # distinct tokens up to which word rows are read one by one


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to within 1.5e-7 (Abramowitz & Stegun 7.1.26). numpy has no erf, and scipy.special
    would add ~1 s of imports to a cold search."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact (erf) GELU."""
    return 0.5 * x * (1.0 + _erf(x * _SQRT_HALF))


def _t(weight: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(weight.T)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(-1, keepdims=True)
    return centred / np.sqrt(var + eps) * weight + bias


@functools.cache
def _blas():
    """threadpoolctl's view of the loaded BLAS (found once: the search walks the loaded libraries)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def is_supported(model_dir: Path) -> bool:
    """Whether ``model_dir`` is a sentence-transformers folder this module can run: a BERT
    (absolute positions, GELU) with ``model.safetensors`` and ``tokenizer.json``, followed by
    mean pooling (and optionally normalisation), nothing else."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        modules = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
        pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    types = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    flags = {k: v for k, v in pooling.items() if k.startswith("pooling_mode_") and v}
    return (config.get("model_type") == "bert" and config.get("hidden_act") == "gelu"
            and config.get("position_embedding_type", "absolute") == "absolute"
            and types in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"])
            and set(flags) == {"pooling_mode_mean_tokens"}
            and (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file())


class NumpyBertEncoder:
    """L2-normalised sentence embeddings from a BERT sentence-transformers folder (see
    :func:`is_supported`), float32, one row per text; used like :class:`models.text_encoder.TextEncoder`."""

    def __init__(self, model_dir: str | Path) -> None:
        from safetensors import safe_open
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        st_config = json.loads((model_dir / "sentence_bert_config.json").read_text(encoding="utf-8"))
        self.dim: int = int(config["hidden_size"])
        self.name = model_dir.name
        self._heads = int(config["num_attention_heads"])
        self._eps = float(config["layer_norm_eps"])
        # sentence-transformers truncates at max_seq_length (capped by the position table) and
        # pads to the longest text of a batch; tokenizer.json's own settings are overridden.
        max_length = min(int(st_config.get("max_seq_length") or 512), int(config["max_position_embeddings"]))
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length)
        self._tokenizer.no_padding()
        # The word table (30522 x 384, half the file) stays in the memory-mapped file: a query
        # reads only its own tokens' rows; the whole table is loaded once a batch needs many.
        self._file = safe_open(str(model_dir / "model.safetensors"), framework="numpy")
        self._word_rows = self._file.get_slice(_WORD)
        self._word: np.ndarray | None = None
        w = {key: self._file.get_tensor(key) for key in self._file.keys()
             if key.startswith(("embeddings.", "encoder.")) and key != _WORD}
        self._position = w["embeddings.position_embeddings.weight"]
        self._token_type = w["embeddings.token_type_embeddings.weight"][0]
        self._embedding_norm = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self._layers = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            qkv = np.concatenate([w[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value")])
            qkv_bias = np.concatenate([w[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
            self._layers.append((  # [in, out] copies of the stored [out, in]: ~15% faster products
                _t(qkv), qkv_bias,
                _t(w[p + "attention.output.dense.weight"]), w[p + "attention.output.dense.bias"],
                w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"],
                _t(w[p + "intermediate.dense.weight"]), w[p + "intermediate.dense.bias"],
                _t(w[p + "output.dense.weight"]), w[p + "output.dense.bias"],
                w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
            ))

    def _words(self, ids: np.ndarray) -> np.ndarray:
        """Word embeddings of token ``ids`` (any shape) → ids.shape + (dim,)."""
        unique, inverse = np.unique(ids, return_inverse=True)
        if self._word is None and len(unique) > _ROWS_READ_ALONE:
            self._word = self._file.get_tensor(_WORD)
        if self._word is not None:
            return self._word[ids]
        rows = np.stack([self._word_rows[int(i):int(i) + 1][0] for i in unique])
        return rows[inverse.reshape(ids.shape)]

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embed ``texts`` → (N, dim) float32 unit vectors (normalised like ``TextEncoder``)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Batches of similar lengths waste little on padding (as sentence-transformers sorts).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        # One BLAS thread: these products are small, and on 2 busy cores OpenBLAS's spinning
        # threads made a query 3x slower (48 vs 178 ms under load 5); parallelism comes from
        # processes (see models/torch_threads.py for the same finding with torch).
        with _blas().limit(limits=1, user_api="blas"):
            for start in range(0, len(texts), batch_size):
                chosen = order[start:start + batch_size]
                out[chosen] = self._encode_batch([texts[i] for i in chosen])
        return out

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        length = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), length), dtype=np.int64)
        mask = np.zeros((len(texts), length), dtype=np.float32)
        for row, encoding in enumerate(encodings):
            ids[row, :len(encoding.ids)] = encoding.ids
            mask[row, :len(encoding.ids)] = 1.0
        x = self._words(ids) + self._position[:length] + self._token_type
        x = _layer_norm(x, *self._embedding_norm, self._eps)
        bias = ((1.0 - mask) * np.finfo(np.float32).min)[:, None, None, :]  # masks padded keys
        for layer in self._layers:
            x = self._layer(x, bias, *layer)
        pooled = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def _layer(self, x, bias, qkv, qkv_b, out, out_b, norm1_w, norm1_b, inter, inter_b, down, down_b,
               norm2_w, norm2_b) -> np.ndarray:
        batch, length, width = x.shape
        head = width // self._heads
        q, k, v = (x @ qkv + qkv_b).reshape(batch, length, 3, self._heads, head).transpose(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(head)) + bias
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)
        x = _layer_norm(x + context @ out + out_b, norm1_w, norm1_b, self._eps)
        return _layer_norm(x + _gelu(x @ inter + inter_b) @ down + down_b, norm2_w, norm2_b, self._eps)
