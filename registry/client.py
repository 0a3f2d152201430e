"""The registry client: ``from registry import Registry``.

:class:`Registry` is the store (tables, versions, reads) plus what sits above both halves:
ingest of files and folders, base models, search, maintenance and pruning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from registry.atomic_write import write_atomically
from registry.store.encoders import EncoderRecord, encoder_records, register_encoder
from registry.store.maintenance import MaintenanceReport, maintain
from registry.store.search import NoWeightEncoder, Searcher, SearchHit
from registry.store.store import Store, quote, user_path

if TYPE_CHECKING:
    from registry.embed import EmbedReport
    from registry.ingest import IngestReport
    from registry.lora.base_models import BaseModel
    from registry.text_vectors import TextVectorReport


class Registry(Store):
    """A LoRA registry folder. ``Registry.open(path)`` creates it when missing;
    ``Registry.open(path, create=False)`` only reads an existing one; ``Registry.open(path,
    version=N | "tag")`` is a read-only view of every table as it was then."""

    def __init__(self, root: Path, version: int | str | None = None) -> None:
        super().__init__(root, version)
        self._searcher = Searcher(self)

    # ---- base models -------------------------------------------------------------------
    @property
    def _bases_dir(self) -> Path:
        return self.root / "bases"

    def register_base(self, base: BaseModel) -> None:
        """Make LoRAs for ``base`` recognisable (persisted in ``bases/NAME.json``); a name already
        used by a base with other layers (a built-in's included) is a ValueError."""
        self._writable()
        known = next((b for b in self.bases() if b.name == base.name), None) if base.name in self.base_names() else None
        if known is not None and not known.same_layers(base):
            raise ValueError(f"a different base named {base.name!r} is already known ({known.architecture}, "
                             f"{len(known.layer_shapes)} layers; this one has {len(base.layer_shapes)}): "
                             "register it under another name")
        self._bases_dir.mkdir(exist_ok=True)
        target = self._bases_dir / f"{base.name.replace('/', '__')}.json"
        write_atomically(target, base.to_json())

    def bases(self) -> list[BaseModel]:
        """The built-in FLUX.1-dev and FLUX.1-schnell plus every registered base model."""
        from registry.lora.base_models import BaseModel, builtin_bases

        registered = [_registered(path, BaseModel.from_json) for path in sorted(self._bases_dir.glob("*.json"))]
        return [*builtin_bases(), *registered]

    def base_names(self) -> list[str]:
        """The names of :meth:`bases` (read without building their layer shapes)."""
        from registry.lora.base_models import BUILTIN_BASE_NAMES

        registered = [_registered(p, lambda text: json.loads(text)["name"]) for p in sorted(self._bases_dir.glob("*.json"))]
        return [*BUILTIN_BASE_NAMES, *registered]

    def _check_base(self, base_model: str) -> None:
        """Raise ``ValueError`` where ``base_model`` is neither a base of :meth:`bases` nor one
        that any row (removed ones too) has."""
        names = self.base_names()
        if base_model in names or self.loras.count_rows(f"base_model = {quote(base_model)}"):
            return
        stored = {row["base_model"] for row in self.column_rows(self.loras, ["base_model"])} - {None}
        known = list(dict.fromkeys([*names, *sorted(stored)]))
        raise ValueError(f"unknown base model {base_model!r}; known: {', '.join(known)}")

    # ---- writes ------------------------------------------------------------------------
    def add(self, paths: str | os.PathLike | Iterable[str | os.PathLike], *, progress: bool = False,
            batch_size: int = 64) -> IngestReport:
        """Ingest files and folders (one path or a list of them; folders are walked; ``~`` and
        ``$VARS`` expanded). Known files whose size, mtime and inode are unchanged cost a stat;
        new sidecars refresh their LoRA's row. Returns an :class:`registry.ingest.IngestReport`;
        bad files are in it, never raised, and broken sidecars are in its ``warnings``."""
        from registry.ingest import ingest_paths

        self._writable()
        return ingest_paths(self, paths, progress=progress, batch_size=batch_size)

    def set_captions(self, updates: Mapping[str, tuple[Sequence[str], str]],
                     renders: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None, *,
                     seen: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None) -> int:
        """Store ``{lora_id: (captions, model)}`` (one caption per render) in one write, with the
        search text and its vector rebuilt; ``renders`` replaces render lists in that write; rows
        whose renders are no longer those ``seen`` when planning are left alone. Returns the rows
        written. See :func:`registry.captions.set_captions`."""
        from registry.captions import set_captions

        self._writable()
        return set_captions(self, updates, renders, seen=seen)

    # ---- the LoRA-weight encoder ---------------------------------------------------------
    def register_encoder(self, checkpoint: str | os.PathLike, activate: bool = True) -> EmbedReport:
        """Add a trained encoder checkpoint (its version and base model are in its metadata) and,
        with ``activate``, embed every LoRA of its base with it and switch search to it at once."""
        from models.encoder import LoRAWeightEncoder
        from registry.embed import EmbedReport, switch_encoder

        self._writable()
        encoder = LoRAWeightEncoder.load(user_path(checkpoint))  # checks the file; gives its version
        if not encoder.version or "base_model" not in encoder.extra:
            raise ValueError(f"{checkpoint}: an encoder checkpoint without a version or base model")
        record = register_encoder(self, user_path(checkpoint), encoder.version, encoder.extra["base_model"],
                                  encoder.extra)
        return switch_encoder(self, record.version, self.bases()) if activate else EmbedReport()

    def encoder_versions(self) -> list[EncoderRecord]:
        """Every registered encoder version (``active`` marks the one search uses per base)."""
        return encoder_records(self)

    def refresh_embeddings(self) -> EmbedReport:
        """Embed the LoRAs that lack their base's active encoder vector (incremental)."""
        from registry.embed import refresh_embeddings

        return refresh_embeddings(self, self.bases())

    def refresh_text_vectors(self, progress: bool = False) -> TextVectorReport:
        """Make every LoRA's text vector again from its search text with the current text recipe
        (rows written by older versions keep theirs otherwise); one commit for those that changed."""
        from registry.text_vectors import refresh_text_vectors

        return refresh_text_vectors(self, progress)

    def maintain(self, collect_blobs: bool = False) -> MaintenanceReport:
        """Refresh every index and compact the tables (the CLI runs it after each ingest);
        ``collect_blobs``: also remove LoRA blobs no row refers to (``autolora maintain`` does)."""
        return maintain(self, collect_blobs)

    def prune(self) -> dict[str, int]:
        """Mark LoRAs whose every known path is gone as removed (hidden from search), and rebuild
        the card data of those whose copies changed (a duplicate's card gone or back)."""
        from registry.ingest import prune_and_refresh

        return prune_and_refresh(self)

    # ---- search ------------------------------------------------------------------------
    def search(self, prompt: str, k: int = 10, channel: str = "hybrid", base_model: str | None = None,
               where: str | None = None, include_removed: bool = False, encoder=None) -> list[SearchHit]:
        """Top-``k`` LoRAs for ``prompt``. ``channel``: ``weights`` (the LoRA-weight encoder's
        embedding of the weights alone; cosine score), ``text`` (full text over names, trigger
        words, render prompts, captions + the text embedding of them, fused by z-normalised scores)
        or ``hybrid`` (all three fused; score 1.0 = first in every list). ``where`` is a LanceDB
        SQL filter (e.g. ``"lora_id IN ('a', 'b')"``); removed LoRAs are hidden unless asked for;
        ``encoder`` replaces the default text encoder for the query. An empty prompt, or a
        ``base_model`` that the registry does not know, raises ``ValueError``."""
        try:
            hits = self._searcher.search(prompt, k, base_model, channel, encoder, where, include_removed)
        except NoWeightEncoder:
            if base_model:  # an unknown base is the first thing to fix
                self._check_base(base_model)
            raise
        if base_model and not hits:  # only then: a hit proves the base known
            self._check_base(base_model)
        return hits

    def search_by_vector(self, vector, k: int = 5, base_model: str | None = None,
                         column: str = "text_vector", where: str | None = None) -> list[SearchHit]:
        """Top-``k`` by cosine similarity to ``vector`` in ``column`` (ANN once indexed)."""
        return self._searcher.by_vector(vector, k, base_model, column, where)


def _registered(path, read):
    """``read(text)`` of a registered base's file; a file that does not read is a ``ValueError`` naming it."""
    try:
        return read(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a base model description ({error}); fix or delete it, then register "
                         "the base again (autolora register-base)") from None
