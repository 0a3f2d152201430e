"""Ingest LoRA files and folders into a :class:`registry.store.Registry`.

Crash-safe and idempotent: blobs are written atomically before any row refers to them, rows are
upserted in batches keyed by content (``lora_id`` comes from the weights fingerprint, files by
sha256), so a run killed at any point and run again ends with the same registry, and two processes
ingesting overlapping folders cannot create duplicate LoRAs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from models.torch_threads import one_torch_thread
from registry.hashing import sha256_file
from registry.lora.errors import RejectedFile
from registry.lora.inspect import InspectedLoRA, inspect_file
from registry.lora.metadata import LoraMetadata, from_header, from_sidecars
from registry.store.maintenance import ensure_indexes
from registry.store.store import Store as Registry, quote as _quote

# Files that may be LoRAs when found while walking a folder (everything else there is a sidecar).
# An explicitly named file is always considered, whatever its extension.
CANDIDATE_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".lora"}


@dataclass
class IngestReport:
    """What one ``add`` did; ``to_dict`` is the ``autolora ingest --json`` contract."""

    added: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"added": self.added, "duplicates": self.duplicates, "rejected": self.rejected}


def lora_id_for(fingerprint: str) -> str:
    """Stable id of a LoRA: its weights fingerprint, so every format of it maps to one id."""
    return f"lora-{fingerprint[:24]}"


def collect_candidates(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand folders (recursively) into candidate files, sorted, without repeats."""
    found: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in CANDIDATE_SUFFIXES:
                    found.setdefault(str(child.resolve()), child)
        else:
            found.setdefault(str(path.resolve()), path)
    return [found[key] for key in sorted(found)]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _existing(table, column: str, values: list[str]) -> dict[str, dict]:
    if not values:
        return {}
    where = f"{column} IN ({', '.join(_quote(v) for v in values)})"
    return {row[column]: row for row in table.search().where(where).limit(len(values) + 1).to_list()}


class _Batch:
    """Rows waiting to be written together (every write is a table version: batch them)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.loras: dict[str, dict] = {}
        self.files: dict[str, dict] = {}
        self.rejections: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self.loras) + len(self.files) + len(self.rejections)

    def flush(self) -> None:
        reg = self.registry
        if self.loras:
            rows = list(self.loras.values())
            missing = [row for row in rows if "text_vector" not in row]
            for row, vector in zip(missing, _embed([r["search_text"] for r in missing])):
                row["text_vector"] = vector
            reg.upsert(reg.loras, rows, "lora_id", update=False)
        reg.upsert(reg.files, list(self.files.values()), "path", update=True)
        reg.upsert(reg.rejections, list(self.rejections.values()), "rejection_id", update=True)
        self.loras.clear(), self.files.clear(), self.rejections.clear()


def _embed(texts: list[str]) -> list[list[float]]:
    """Text vectors of ``texts`` with the default encoder."""
    if not texts:
        return []
    from models.text_encoder import default_text_encoder

    with one_torch_thread():  # a few short texts: OpenMP barriers cost more than they give
        return [v.tolist() for v in default_text_encoder().encode(texts)]


def _metadata(info: InspectedLoRA) -> LoraMetadata:
    meta = from_header(info.header_metadata)
    meta.update(from_sidecars(info.path))
    return meta


@dataclass
class _Early:
    """What an accepted file needs besides its hash, made while its blob copy still runs."""

    lora_id: str
    stored: dict | None  # the row already stored under lora_id, if any
    meta: LoraMetadata
    vector: list[float]


def _early(reg: Registry, batch: _Batch, info: InspectedLoRA) -> _Early:
    lora_id = lora_id_for(info.fingerprint)
    stored = batch.loras.get(lora_id) or _existing(reg.loras, "lora_id", [lora_id]).get(lora_id)
    meta = _metadata(info)
    return _Early(lora_id, stored, meta, _embed([meta.search_text()])[0])


def _drop(reg: Registry, future) -> None:
    """Wait for a staging copy that is no longer wanted and remove it."""
    try:
        reg.blobs.discard(future.result()[1])
    except Exception:  # noqa: BLE001 - the error that made us drop it is the one to raise
        pass


def _unreadable(report: IngestReport, shown: str, error: OSError) -> None:
    report.rejected.append({"path": shown, "reason": f"unreadable: {error}", "code": "unreadable"})


def _lora_row(reg: Registry, info: InspectedLoRA, lora_id: str, staged: Path | None = None,
              early: _Early | None = None) -> dict:
    meta = early.meta if early is not None else _metadata(info)
    render_blobs = []
    for render in meta.render_paths:
        if os.path.isfile(render):
            sha = sha256_file(render)
            suffix = Path(render).suffix.lower()
            render_blobs.append(str(reg.blobs.put(render, sha, suffix).relative_to(reg.root)))
        else:
            render_blobs.append("")
    if staged is not None:  # the copy made while hashing: renamed into place now, complete
        blob = reg.blobs.commit(staged, info.sha256)
    else:
        blob = reg.blobs.put(info.path, info.sha256)
    row = {
        "lora_id": lora_id, "name": meta.name, "description": meta.description,
        "trigger_words": meta.trigger_words, "tags": meta.tags, "architecture": info.architecture,
        "base_model": info.base_model, "format": info.format, "rank": info.rank, "layers": info.layers,
        "sha256": info.sha256, "fingerprint": info.fingerprint, "size_bytes": info.size,
        "blob": str(blob.relative_to(reg.root)), "source_path": str(info.path.resolve()),
        "render_prompts": meta.render_prompts, "render_blobs": render_blobs, "captions": [],
        "header_metadata": json.dumps(info.header_metadata, sort_keys=True),
        "search_text": meta.search_text(), "added_at": _now(),
    }
    if early is not None:
        row["text_vector"] = early.vector
    return row


def _maybe_known(reg: Registry, batch: _Batch, path: Path) -> bool:
    """Whether ``path`` could be a file already ingested (a stored LoRA of the same size): then it
    is hashed before inspection, so a duplicate costs no inspect. Otherwise hashing (and staging
    the blob copy) runs alongside inspection. A duplicate this misses (e.g. a file that was a
    fingerprint duplicate) is still caught by its sha256 after inspection: only work is wasted."""
    try:
        size = path.stat().st_size
    except OSError:
        return True  # the sequential path reports it as unreadable
    if any(row["size_bytes"] == size for row in batch.loras.values()):
        return True
    return bool(reg.files.search().where(f"size_bytes = {int(size)}").limit(1).to_list())


def ingest_paths(reg: Registry, paths: Iterable[str | os.PathLike], *, progress: bool = False,
                 batch_size: int = 64) -> IngestReport:
    """Ingest every candidate file under ``paths``; bad files are recorded, never raised."""
    report = IngestReport()
    batch = _Batch(reg)
    bases = reg.bases()
    candidates = collect_candidates(paths)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="autolora-hash") as pool:
        for path in tqdm(candidates, desc="ingest", unit="file", disable=not progress):
            _ingest_one(reg, batch, report, bases, path, pool)
            if len(batch) >= batch_size:
                batch.flush()
    batch.flush()
    ensure_indexes(reg)
    return report


def _ingest_one(reg: Registry, batch: _Batch, report: IngestReport, bases, path: Path,
                pool: ThreadPoolExecutor) -> None:
    shown = str(path)
    staged: Path | None = None
    outcome: InspectedLoRA | RejectedFile | None = None
    early: _Early | None = None
    future = None
    try:
        if _maybe_known(reg, batch, path):
            sha = sha256_file(path)
        else:  # hash + stage the blob copy in a thread (hashlib and file I/O drop the GIL)
            future = pool.submit(reg.blobs.stage, path)
            try:
                outcome = inspect_file(path, bases, sha256="pending")  # the real one set below
            except RejectedFile as rejection:
                outcome = rejection
            except BaseException:
                _drop(reg, future)
                raise
    except OSError as error:
        _unreadable(report, shown, error)
        return
    if future is not None:
        if isinstance(outcome, InspectedLoRA) and not future.done():
            try:
                early = _early(reg, batch, outcome)  # instead of waiting idle for the copy
            except BaseException:
                _drop(reg, future)
                raise
        try:
            sha, staged = future.result()
        except OSError as error:
            _unreadable(report, shown, error)
            return
    try:
        known_file = (next((f for f in batch.files.values() if f["sha256"] == sha), None)
                      or _existing(reg.files, "sha256", [sha]).get(sha))
        if known_file:
            report.duplicates.append({"path": shown, "lora_id": known_file["lora_id"], "kind": "sha256"})
            return
        if outcome is None:
            try:
                outcome = inspect_file(path, bases, sha256=sha)
            except RejectedFile as rejection:
                outcome = rejection
        if isinstance(outcome, RejectedFile):
            key = hashlib.sha256(f"{path.resolve()}\0{sha}".encode()).hexdigest()
            batch.rejections[key] = {"rejection_id": key, "path": str(path.resolve()), "sha256": sha,
                                     "code": outcome.code, "reason": outcome.reason,
                                     "rejected_at": _now()}
            report.rejected.append({"path": shown, "reason": outcome.reason, "code": outcome.code})
            return
        info = outcome
        info.sha256 = sha
        if early is not None:
            lora_id, stored = early.lora_id, early.stored
        else:
            lora_id = lora_id_for(info.fingerprint)
            stored = (batch.loras.get(lora_id)
                      or _existing(reg.loras, "lora_id", [lora_id]).get(lora_id))
        if stored and stored["sha256"] != sha:
            report.duplicates.append({"path": shown, "lora_id": lora_id, "kind": "fingerprint"})
        else:  # new, or the file whose row a killed run wrote before its file record
            if not stored:
                batch.loras[lora_id] = _lora_row(reg, info, lora_id, staged, early)
                staged = None  # committed (or discarded as already present)
            report.added.append({"lora_id": lora_id, "path": shown})
        batch.files[str(path.resolve())] = {"sha256": sha, "lora_id": lora_id, "path": str(path.resolve()),
                            "format": info.format, "seen_at": _now()}
    finally:
        reg.blobs.discard(staged)
