"""One LoRA file → validated, canonicalised, fingerprinted and matched to a base model."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from models.torch_threads import one_torch_thread
from registry.lora.base_models import BaseModel, hint_from_metadata, match_base
from registry.hashing import sha256_file
from registry.lora.canonical import CanonicalLoRA, canonicalise, fingerprint
from registry.lora.fingerprint import Inputs
from registry.lora.errors import RejectedFile
from registry.lora.finite import check_inspected
from registry.lora.safe_read import check_finite, read_safetensors


@dataclass
class InspectedLoRA:
    """What ingest needs to know about one accepted file."""

    path: Path
    sha256: str
    size: int
    format: str
    architecture: str
    base_model: str
    rank: int
    layers: int
    fingerprint: str
    header_metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what conversion ignored, and what diffusers' check found
    lora: CanonicalLoRA | None = field(default=None, repr=False, compare=False)  # ingest drops it once used

    def summary(self) -> dict:
        """The ``autolora inspect --json`` contract."""
        return {
            "sha256": self.sha256, "format": self.format, "architecture": self.architecture,
            "base_model": self.base_model, "rank": self.rank, "layers": self.layers,
            "fingerprint": self.fingerprint, "notes": self.notes,
        }


def attention_widths(bases: Iterable[BaseModel]) -> dict[int, str]:
    """Attention width -> architecture of the given bases (to recognise LoRAs of small bases)."""
    widths = {}
    for base in bases:
        shape = base.layer_shapes.get("transformer_blocks.0.attn.to_q")
        if shape:
            widths[shape[1]] = base.architecture
    return widths


def load_canonical(path: str | os.PathLike, bases: Iterable[BaseModel] = (), inputs: Inputs | None = None,
                   on_header: Callable[[dict[str, str]], None] | None = None,
                   ) -> tuple[CanonicalLoRA, dict[str, str]]:
    """Read a LoRA file safely and return its canonical form and header metadata. ``bases``: the
    registered bases, whose widths tell their LoRAs' architecture when names alone do not.
    ``inputs``: LoRA-weight encoders' probes (see :func:`registry.lora.canonical.canonicalise`).
    ``on_header``: called with the header metadata as soon as the header is read and checked
    (before the factors are), for work that needs only the header to start beside the rest.

    NaN/Inf are looked for in the fingerprint's pass over the factors (:mod:`registry.lora.finite`),
    not in one more pass over the file; a file refused for another reason that also holds a NaN/Inf
    is refused as that."""
    tensors, metadata = read_safetensors(path, check_finite=False)
    if on_header is not None:
        on_header(metadata)
    try:
        lora = canonicalise(tensors, metadata, attention_widths(bases), inputs)
    except RejectedFile:
        check_finite(path, tensors)
        raise
    check_inspected(path, tensors, lora)
    return lora, metadata


def inspect_file(path: str | os.PathLike, bases: Iterable[BaseModel],
                 sha256: str | Callable[[], str] | None = None,
                 base_hint: str = "", inputs: Inputs | None = None,
                 on_header: Callable[[dict[str, str]], None] | None = None) -> InspectedLoRA:
    """Validate + canonicalise ``path``; raises :class:`RejectedFile` with the reason.

    ``sha256``: the file's hash if known, or a callable giving it (called last, only for an
    accepted file, so the hash can be computed concurrently), or ``None`` to hash here.
    ``base_hint``: text naming the base from outside the file (a card's or Civitai's
    ``base_model``), used after the header's own hint where shapes fit several bases.
    ``inputs``, ``on_header``: see :func:`load_canonical`.
    """
    path = Path(path)
    if not path.is_file():
        if path.is_symlink():  # the code ingest gives the same link
            raise RejectedFile("broken_link", f"{path} is a symlink that is dangling or loops")
        raise RejectedFile("not_a_file", f"{path} is not a regular file")
    bases = list(bases)
    with one_torch_thread():
        lora, metadata = load_canonical(path, bases, inputs, on_header)
        hint = " | ".join(h for h in (hint_from_metadata(metadata), base_hint) if h)
        base = match_base(lora.shapes(), bases, hint)
        if base is None:
            known = ", ".join(b.name for b in bases) or "none"
            raise RejectedFile(
                "unknown_base",
                f"a {lora.architecture} LoRA whose layer names and shapes match no registered base "
                f"model (registered: {known})",
            )
        fp = fingerprint(lora)
        if callable(sha256):
            sha256 = sha256()
        return InspectedLoRA(
            path=path, sha256=sha256 or sha256_file(path), size=path.stat().st_size,
            format=lora.format, architecture=lora.architecture, base_model=base.name,
            rank=lora.rank, layers=len(lora.factors), fingerprint=fp,
            header_metadata=dict(metadata), notes=list(lora.notes), lora=lora,
        )
