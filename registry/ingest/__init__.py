"""Ingest LoRA files and folders into a registry: files -> :mod:`registry.store`, using
:mod:`registry.lora` to read each file.

Crash-safe and idempotent: blobs are written atomically before any row refers to them, rows are
upserted in batches keyed by content (``lora_id`` comes from the weights fingerprint, file
records by resolved path), so a run killed at any point and run again ends with the same
registry, and two processes ingesting overlapping folders cannot create duplicate LoRAs.

Known files cost a stat: a file record keeps the size, mtime and inode it was hashed at (as
git's index and rsync do), so an unchanged file is not read again; where they differ the sha256
decides. Sidecars (card, ``.civitai.info``, previews) are watched by a signature of their stats:
when it changes, the LoRA's row is rebuilt from its stored header metadata and the sidecars of
every path it is known at, without re-reading the tensors (copies with a card first, then by
path: the same row whichever copy came first, in one run or in several). Each render kept keeps
its caption; a render without one makes the row wait for the next caption pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from registry.hashing import sha256_file
from registry.ingest.batch import Batch
# the walk and the report live beside this module; both are part of its public names
from registry.ingest.candidates import CANDIDATE_SUFFIXES, Candidate, collect_candidates  # noqa: F401
from registry.ingest.read_lease import BeingWritten, read_lease
from registry.ingest.report import IngestReport
from registry.ingest.storage_failure import RegistryWriteFailed, storage_problem, write_failed
from registry.ingest.rows import (  # noqa: F401  (prune_and_refresh: the client's)
    prune_and_refresh, source_fields, store_renders,
)
from registry.lora.errors import RejectedFile
from registry.lora.inspect import InspectedLoRA, inspect_file
from registry.lora.metadata import (
    LoraMetadata, from_header, from_sidecars, header_then_sidecars, sidecar_files, sidecar_signature,
)
from registry.store.maintenance import ensure_indexes
from registry.store.store import Store, where_in
from registry.text import embed_documents

_LOOKUP_CHUNK = 500  # paths per prefetch query
# From this size on, a new file of a size already stored is copied beside its inspection (see
# _FileIngest._known_size); FLUX LoRAs are 20-700 MB, SDXL ones 20-400 MB
COPY_BESIDE_BYTES = 8 << 20


def lora_id_for(fingerprint: str) -> str:
    """Stable id of a LoRA: its weights fingerprint, so every format of it maps to one id."""
    return f"lora-{fingerprint[:24]}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _lora_row(reg: Store, info: InspectedLoRA, lora_id: str, meta: LoraMetadata,
              staged: Path | None, vector: list[float] | None) -> dict:
    blob = reg.blobs.commit(staged, info.sha256) if staged else reg.blobs.put(info.path, info.sha256)
    n_renders = len(meta.render_paths)
    render_blobs = store_renders(reg, meta)
    if len(render_blobs) < n_renders:  # a render stored twice was dropped: so was its prompt
        vector = None  # made again at flush, from the document stored
    return {
        "lora_id": lora_id, "name": meta.name, "description": meta.description,
        "trigger_words": meta.trigger_words, "tags": meta.tags, "architecture": info.architecture,
        "base_model": info.base_model, "format": info.format, "rank": info.rank, "layers": info.layers,
        "sha256": info.sha256, "fingerprint": info.fingerprint, "size_bytes": info.size,
        "blob": str(blob.relative_to(reg.root)), "source_path": os.path.realpath(info.path),
        "render_prompts": meta.render_prompts, "render_blobs": render_blobs, "captions": [],
        "header_metadata": json.dumps(info.header_metadata, sort_keys=True),
        "search_text": meta.search_text(), "text_vector": vector, "added_at": _now(), "removed": False,
        **source_fields(meta),
    }


def _early(meta: LoraMetadata) -> list[float] | None:  # its own function: tests watch that it runs
    """The text vector of a new LoRA, made beside its blob copy or its inspection."""
    return embed_documents([meta.search_text()])[0]


def _made(vector: list[float] | None) -> Future:
    done: Future = Future()
    done.set_result(vector)
    return done


def _prefetch(reg: Store, candidates: list[Candidate]) -> dict[str, dict]:
    """The stored file records of ``candidates``' paths, in a few indexed queries."""
    paths = [os.path.realpath(c.path) for c in candidates]
    known: dict[str, dict] = {}
    for start in range(0, len(paths), _LOOKUP_CHUNK):
        chunk = paths[start:start + _LOOKUP_CHUNK]
        where = where_in("path", chunk)
        if reg.files.count_rows(where):  # one call (~1 ms); the rows' query costs ~4 ms even when empty
            for row in reg.rows(reg.files, where, len(chunk)):
                known[row["path"]] = row
    return known


def _utf8_name(path: str | os.PathLike, report: IngestReport) -> bool:
    """Whether ``path`` can be recorded (the tables hold UTF-8); a name that cannot is rejected."""
    try:
        os.fspath(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        shown = os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        report.reject(shown, "bad_name", "the file's path is not valid UTF-8 (renaming it fixes that)")
        return False


def ingest_paths(reg: Store, paths: str | os.PathLike | Iterable[str | os.PathLike], *, progress: bool = False,
                 batch_size: int = 64) -> IngestReport:
    """Ingest every candidate file under ``paths`` (one path or several); bad files are recorded,
    never raised (a path that does not exist raises ``FileNotFoundError`` before anything is
    written), and so are broken sidecars (in ``warnings``: the LoRA is ingested without them)."""
    report = IngestReport()
    reg.check_writable()  # a registry it cannot write to is said once, not blamed on every file
    candidates = [c for c in collect_candidates(paths, report) if _utf8_name(c.path, report)]
    known = _prefetch(reg, candidates)
    batch = Batch(reg, report)
    bases = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="autolora-hash") as pool:
        for done, candidate in enumerate(tqdm(candidates, desc="ingest", unit="file", disable=not progress)):
            ingest = _FileIngest(reg, batch, report, candidate, known.get(os.path.realpath(candidate.path)))
            try:
                if not ingest.unchanged():
                    bases = bases if bases is not None else reg.bases()
                    ingest.run(bases, pool)
            except RegistryWriteFailed:
                raise
            except Exception as error:  # noqa: BLE001  a bug one file triggers must not lose the batch
                _stop_if_storage_failed(batch, error, done, len(candidates))
                if isinstance(error, OSError):  # reading it again to copy it in (its size was known)
                    ingest.reject_unreadable(error)
                else:
                    ingest.reject_internal(error)
            if len(batch) >= batch_size:
                _flush(batch, done + 1, len(candidates))
    _flush(batch, len(candidates), len(candidates))
    ensure_indexes(reg, tables=batch.written)  # only those missing: refreshing them is maintenance's job
    return report


def _stop_if_storage_failed(batch: Batch, error: BaseException, done: int, total: int) -> None:
    """Raise :class:`RegistryWriteFailed` when ``error`` is the registry's storage failing (full,
    read-only): each file after it would fail the same way, so it must not be blamed on them. The
    ``done`` files before it are recorded but for those of the batch not yet written."""
    why = storage_problem(batch.reg, error)
    if why:
        recorded = done - len(batch.files) - len(batch.rejections)
        raise write_failed(batch.reg, why, recorded, total) from error


def _flush(batch: Batch, done: int, total: int) -> None:
    try:
        batch.flush()
    except Exception as error:
        _stop_if_storage_failed(batch, error, done, total)
        raise


@dataclass
class _Early:
    """What a new-looking LoRA needs that is computed while its bytes are still hashed and
    copied in the other thread, instead of after (``done`` False: nothing was)."""

    done: bool = False
    stored: dict | None = None  # the stored row of its lora_id
    text: Future | None = None  # its text vector (None: made in a batch at flush)
    weights: tuple[list[float], str] | None = None  # the embedder's result (None: no encoder)


class _FileIngest:
    """One candidate file through the stat cache, hashing, inspection and the batch."""

    def __init__(self, reg: Store, batch: Batch, report: IngestReport, candidate: Candidate,
                 record: dict | None) -> None:
        self.reg, self.batch, self.report = reg, batch, report
        self.path, self.shown = candidate.path, str(candidate.path)
        self.resolved = os.path.realpath(candidate.path)
        self.siblings = candidate.siblings
        self.sidecars = sidecar_files(candidate.path, candidate.siblings)
        self.record = record  # the stored file record of this path, if any
        self.stat: os.stat_result | None = None

    def reject_unreadable(self, error: OSError) -> None:
        """Report this file as unreadable (not recorded: a later run may read it)."""
        self.report.reject(self.shown, "unreadable", f"unreadable: {error.strerror or error}")

    def reject_internal(self, error: Exception) -> None:
        """Record a failure no check foresaw (a bug) as this file's rejection; the batch goes on."""
        reason = f"internal error while ingesting it (please report): {type(error).__name__}: {error}"[:500]
        key = hashlib.sha256(f"{self.resolved}\0internal".encode()).hexdigest()
        self.batch.rejections[key] = {"rejection_id": key, "path": self.resolved, "sha256": "",
                                      "code": "internal_error", "reason": reason, "rejected_at": _now()}
        self.report.reject(self.shown, "internal_error", reason)

    def _file_row(self, sha: str, lora_id: str, fmt: str) -> dict:
        st = self.stat
        return {"path": self.resolved, "sha256": sha, "lora_id": lora_id, "format": fmt,
                "size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
                "sidecars": sidecar_signature(self.sidecars), "seen_at": _now(), "gone": False}

    def _known_content(self, record: dict) -> None:
        """This path holds bytes already recorded (``record``): refresh what changed around it."""
        row = self._file_row(record["sha256"], record["lora_id"], record["format"])
        stale = row["sidecars"] != record["sidecars"] or record["gone"]
        entry = {"path": self.shown, "lora_id": record["lora_id"]}
        if stale:
            self.batch.refresh.add(record["lora_id"])
            self.report.refreshed.append(entry)
        else:
            self.report.unchanged.append(entry)
        if stale or any(row[k] != record[k] for k in ("size_bytes", "mtime_ns", "inode")):
            self.batch.files[self.resolved] = row

    def unchanged(self) -> bool:
        """Settle the file from its stat alone when it can be (no read, no hash)."""
        try:
            self.stat = os.stat(self.path)
        except OSError as error:
            self.reject_unreadable(error)
            return True
        record, st = self.record, self.stat
        if record and (record["size_bytes"], record["mtime_ns"], record["inode"]) == (
                st.st_size, st.st_mtime_ns, st.st_ino):
            self._known_content(record)
            return True
        return False

    def _known_size(self) -> tuple[bool, bool]:
        """``(size_seen, hash_first)``: whether a stored file (or one of this batch) has this size, so
        its sha256 must be looked up, and whether one also has its mtime (or this path has a
        record): a moved or hard-linked copy (``mv`` and links keep the mtime), most likely the
        same bytes, is only hashed beside its inspection, with no blob copy, and copied once its
        hash says it is new. Any other file is staged (hashed and copied in one pass) beside
        inspection, a new one of a size seen before too: LoRAs of one shape and format often
        have the same size (an XLabs file added to a registry holding one of its size took 3.2x
        its floor when only hashed first, 1.9x staged). A staged duplicate (a re-download) is
        still caught by its sha256 and its copy dropped: only the copy is wasted. Below
        :data:`COPY_BESIDE_BYTES` a file of a seen size is only hashed first, as before: its copy
        after is short, and the mtime look-up would cost more than it saves (rank-2 LoRAs of a few
        layers at 10,000 rows: 42-58 files/s with it, 50-66 without)."""
        if self.record:
            return True, True
        size, mtime = int(self.stat.st_size), int(self.stat.st_mtime_ns)
        same = [f for f in self.batch.files.values() if f["size_bytes"] == size]
        if not same and not self.reg.files.count_rows(f"size_bytes = {size}"):  # most files: one call
            return False, False
        if size < COPY_BESIDE_BYTES or any(f["mtime_ns"] == mtime for f in same):
            return True, True
        return True, self.reg.files.count_rows(f"size_bytes = {size} AND mtime_ns = {mtime}") > 0

    def run(self, bases: list, pool: ThreadPoolExecutor) -> None:
        """Hash, dedupe, inspect and stage one file that its stat did not settle: the hash (with
        the blob copy, or alone when the size is known) runs in ``pool``'s thread while the file
        is inspected in this one (hashlib and file I/O drop the GIL)."""
        sidecars = from_sidecars(self.path, self.siblings, name_from_stem=False, warnings=self.report.warnings)
        with contextlib.ExitStack() as stack:
            try:  # no truncation under our memory maps (a SIGBUS) until the file is read and copied
                stack.enter_context(read_lease(self.path))
            except BeingWritten as error:
                return self.reject_unreadable(error)
            self._read_and_settle(bases, sidecars, pool)

    def _read_and_settle(self, bases: list, sidecars: LoraMetadata, pool: ThreadPoolExecutor) -> None:
        staged: Path | None = None
        try:
            try:
                size_seen, hash_first = self._known_size()
                # the encoders' probes for a file likely new, read before the hash thread starts: a
                # LanceDB read beside it takes 8-17 ms instead of ~3 (both cores busy)
                inputs = None if hash_first else self.batch.embedder.inputs()
                future = pool.submit(sha256_file if hash_first else self.reg.blobs.stage, self.path)
                text: list = []  # (future, document) of the text vector, queued behind the copy
                early = _Early()

                def queue_text(header: dict[str, str]) -> None:
                    document = _header_first(header, sidecars, self.path)
                    text.append((pool.submit(_early, document), document))

                try:
                    outcome = self._inspect(bases, sidecars, inputs, None if hash_first else queue_text)
                    if isinstance(outcome, InspectedLoRA) and not hash_first:
                        early = self._while_copying(outcome, text[0] if text else None, pool)
                finally:
                    if text and not early.text:
                        text[0][0].cancel()  # not needed (a rejection, a known LoRA) if not begun
                    sha, staged = (future.result(), None) if hash_first else future.result()
            except OSError as error:  # reading the file, or writing its copy into the store
                if storage_problem(self.reg, error):
                    raise
                return self.reject_unreadable(error)
            self._settle(sha, outcome, sidecars, staged, early, size_seen)
        finally:
            self.reg.blobs.discard(staged)  # a no-op once committed into the store

    def _while_copying(self, info: InspectedLoRA, text: tuple[Future, LoraMetadata] | None,
                       pool: ThreadPoolExecutor) -> _Early:
        """Beside the copy: its text vector, queued in the hash thread when the header was read (it
        runs there once the copy is done, beside the rest of inspection), is made in this thread
        instead when the copy still runs; then its ``lora_id`` is looked up and, for a new one, its
        weight embedding made (the hash thread takes a share once the copy is done). Wasted only
        when the bytes turn out to be a duplicate of a file of this batch or of a stored LoRA."""
        vector, document = text if text else (None, None)
        if vector is not None and vector.cancel():  # not begun: the copy still runs, so made here beside it
            vector = _made(_early(document))  # (first: the look-up and embedding may outlast the copy)
        stored = self.batch.stored_lora(lora_id_for(info.fingerprint))
        if stored is not None:
            return _Early(done=True, stored=stored)
        weights = self.batch.embedder.embed(info.base_model, info.lora.factors, helper=pool,
                                            responses=info.lora.responses)
        return _Early(done=True, text=vector, weights=weights)

    def _inspect(self, bases: list, sidecars: LoraMetadata, inputs: dict | None,
                 on_header: Callable[[dict[str, str]], None] | None) -> InspectedLoRA | RejectedFile:
        """``inputs``: the active encoders' probes, whose layer responses inspection then makes in
        its pass over the factors, for the embedding to start from (float32 factors: -25 ms);
        ``on_header``: called with the header's metadata once it is read."""
        try:
            return inspect_file(self.path, bases, sha256="pending", base_hint=sidecars.base_model_hint, inputs=inputs,
                                on_header=on_header)
        except RejectedFile as rejection:
            return rejection

    def _settle(self, sha: str, outcome, sidecars: LoraMetadata, staged: Path | None,
                early: _Early, size_seen: bool) -> None:
        if self.record and self.record["sha256"] == sha:  # touched, same bytes
            return self._known_content(self.record)
        same_bytes = self.batch.file_with_sha(sha, stored=size_seen)  # same bytes, same size
        if same_bytes:
            self.report.duplicates.append({"path": self.shown, "lora_id": same_bytes["lora_id"],
                                           "kind": "sha256"})
            if same_bytes.get("gone"):  # a copy of a LoRA pruned as gone: its row is rebuilt, unmarked
                self.batch.refresh.add(same_bytes["lora_id"])
            return self._record(sha, same_bytes["lora_id"], same_bytes["format"], new=False)
        if isinstance(outcome, RejectedFile):
            key = hashlib.sha256(f"{self.resolved}\0{sha}".encode()).hexdigest()
            self.batch.rejections[key] = {"rejection_id": key, "path": self.resolved, "sha256": sha,
                                          "code": outcome.code, "reason": outcome.reason,
                                          "rejected_at": _now()}
            return self.report.reject(self.shown, outcome.code, outcome.reason)
        info = outcome
        info.sha256 = sha
        lora_id = lora_id_for(info.fingerprint)
        stored = early.stored if early.done else self.batch.stored_lora(lora_id)
        if stored:  # another ingest stored it: these are its bytes (a concurrent ingest between
            # its row and its file record, or a killed run after its row) or another file of it
            same = stored["sha256"] == sha
            entry = {"path": self.shown, "lora_id": lora_id}
            if same and stored.get("source_path") == self.resolved:  # its own row: a run stopped before
                self.report.unchanged.append(entry)  # recording the file (or one running now), not a duplicate
            else:
                self.report.duplicates.append({**entry, "kind": "sha256" if same else "fingerprint"})
            if stored.get("removed"):  # pruned with no path left: a path again, so unmarked
                self.batch.refresh.add(lora_id)
            return self._record(sha, lora_id, info.format, new=same)
        meta = _header_first(info.header_metadata, sidecars, info.path)
        row = _lora_row(self.reg, info, lora_id, meta, staged, early.text.result() if early.text else None)
        embedded = (early.weights if early.done  # zero-shot
                    else self.batch.embedder.embed(info.base_model, info.lora.factors, responses=info.lora.responses))
        if embedded:
            row["weight_vector"], row["encoder_version"] = embedded
        self.batch.loras[lora_id] = row
        info.lora = None  # its tensors are not kept in the batch
        self.report.added.append({"lora_id": lora_id, "path": self.shown})
        self._record(sha, lora_id, info.format, new=True)

    def _record(self, sha: str, lora_id: str, fmt: str, new: bool) -> None:
        """Record this path; a duplicate path that brings sidecars refreshes its LoRA's row."""
        row = self._file_row(sha, lora_id, fmt)
        self.batch.files[self.resolved] = row
        if not new and row["sidecars"]:
            self.batch.refresh.add(lora_id)


def _header_first(header: dict[str, str], sidecars: LoraMetadata, path: str | os.PathLike) -> LoraMetadata:
    """A LoRA file's header metadata first, then its sidecars' (as :func:`registry.ingest.rows.metadata_of`
    orders them)."""
    return header_then_sidecars(from_header(header), sidecars, Path(path).stem)
