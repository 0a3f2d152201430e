"""Helpers that craft good and hostile LoRA files for tests (import as ``bad_files``).

``tests/registry`` has no ``__init__.py``, so pytest puts this folder on ``sys.path`` and
tests here can simply ``import bad_files`` / ``from bad_files import ...``.

* :func:`write_good_safetensors` - a valid file via ``safetensors.torch.save_file``.
* :func:`entry` - one header entry dict (``dtype``/``shape``/``data_offsets``).
* :func:`write_raw_safetensors` - an arbitrary header + data, written byte for byte;
  ``raw_header`` / ``length`` override the JSON bytes / the 8-byte length prefix, and
  ``pad_to`` pads the JSON with spaces to an exact length.
* :func:`write_malicious_pickle` / :func:`write_malicious_torch_save` - files that, if ever
  unpickled (``pickle.load`` / ``torch.load(weights_only=False)``), create ``sentinel``.
  Assert ``not sentinel.exists()`` after feeding them to the code under test.
* :data:`TENSOR_DTYPES` - safetensors dtype name -> torch dtype, for the allowed ones.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

TENSOR_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1}


class PickleBomb:
    """Unpickling this calls ``open(sentinel, 'w')``, i.e. creates the sentinel file."""

    def __init__(self, sentinel: str | Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def write_good_safetensors(path: str | Path, tensors: dict[str, torch.Tensor] | None = None,
                           metadata: dict[str, str] | None = None) -> Path:
    """Write a valid safetensors file (default: a tiny LoRA pair) and return its path."""
    if tensors is None:
        tensors = {"unet.down.lora_A.weight": torch.randn(4, 16),
                   "unet.down.lora_B.weight": torch.zeros(16, 4)}
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def entry(dtype: str, shape: list[int], begin: int = 0, end: int | None = None) -> dict:
    """Header entry; ``end`` defaults to ``begin + prod(shape) * itemsize``."""
    if end is None:
        end = begin + math.prod(shape) * _ITEMSIZE[dtype]
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def write_raw_safetensors(path: str | Path, header: dict | None, data: bytes = b"", *,
                          raw_header: bytes | None = None, length: int | None = None,
                          pad_to: int | None = None) -> Path:
    """Write ``<u64 length><header JSON><data>`` exactly as given, with no validation.

    ``raw_header`` replaces the JSON encoding of ``header``; ``length`` replaces the true
    header length in the prefix (e.g. huge, or past EOF); ``pad_to`` right-pads the JSON
    with spaces to that many bytes.
    """
    hb = raw_header if raw_header is not None else json.dumps(header).encode("utf-8")
    if pad_to is not None:
        assert pad_to >= len(hb), "pad_to is shorter than the header"
        hb = hb + b" " * (pad_to - len(hb))
    n = len(hb) if length is None else length
    Path(path).write_bytes(struct.pack("<Q", n) + hb + data)
    return Path(path)


def write_malicious_pickle(path: str | Path, sentinel: str | Path) -> Path:
    """Plain ``pickle.dumps`` of a :class:`PickleBomb` (starts with the 0x80 PROTO byte)."""
    Path(path).write_bytes(pickle.dumps(PickleBomb(sentinel)))
    return Path(path)


def write_malicious_torch_save(path: str | Path, sentinel: str | Path) -> Path:
    """``torch.save`` (zip format, starts with ``PK\\x03\\x04``) of a dict holding a bomb."""
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": PickleBomb(sentinel)},
               str(path))
    return Path(path)
