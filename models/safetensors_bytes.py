"""Safetensors files whose bytes depend on their content only.

safetensors serialises a file's ``__metadata__`` from a Rust ``HashMap``, whose iteration order is
seeded at random in every process: the same tensors and metadata (two keys or more) give other
bytes, so another sha256, on every run (measured with safetensors 0.8.0: four keys, three
processes, three orders). A re-built demo world then looked like new files to the registry and
to the gate cache, whose version hashes its LoRA files. Here the library writes the file and the
header is then re-serialised with the metadata keys sorted; the tensor entries and the data are
the library's, untouched. Every safetensors file the project writes with metadata goes through it
(LoRAs by ``save_lora``, encoder and gate checkpoints). Written by hand (a header rewrite of a few
lines): no safetensors option orders the metadata.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import torch
from safetensors.torch import save as _save
from safetensors.torch import save_file as _save_file

_ALIGN = 8  # safetensors pads its header with spaces to this alignment; readers strip them


def _sorted_header(header_bytes: bytes) -> bytes | None:
    """The header with ``__metadata__``'s keys sorted and padded to the alignment, or ``None``
    when the order cannot vary (fewer than two keys)."""
    header = json.loads(header_bytes)
    metadata = header.get("__metadata__")
    if not metadata or len(metadata) < 2:
        return None
    ordered = {"__metadata__": dict(sorted(metadata.items()))}
    ordered.update((k, v) for k, v in header.items() if k != "__metadata__")
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % _ALIGN)


def to_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """``safetensors.torch.save`` with the metadata in sorted order."""
    raw = _save(dict(tensors), metadata=dict(metadata) if metadata else None)
    (length,) = struct.unpack("<Q", raw[:8])
    header = _sorted_header(raw[8:8 + length])
    if header is None:
        return raw
    return struct.pack("<Q", len(header)) + header + raw[8 + length:]


def save_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the metadata in sorted order: the library writes the
    file, then its header is rewritten in place (the same length: only the order of the keys
    changes), so no second copy of the tensors is made."""
    _save_file(dict(tensors), os.fspath(path), metadata=dict(metadata) if metadata else None)
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = _sorted_header(handle.read(length))
        if header is None:
            return
        if len(header) == length:
            handle.seek(8)
            handle.write(header)
            return
        data = handle.read()  # our serialisation differs from the library's in length: write it all
        handle.seek(0)
        handle.write(struct.pack("<Q", len(header)) + header + data)
        handle.truncate()
