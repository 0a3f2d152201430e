"""The weight channel's embeddings: LoRA rows embedded by the LoRA-weight encoder.

* At ingest, a new LoRA is embedded with its base model's active encoder, zero-shot (no
  retraining): :class:`WeightEmbedder`.
* :func:`refresh_embeddings` embeds the rows that lack the active version's vector (incremental:
  rows added before the encoder existed, or by a process that raced a switch).
* :func:`switch_encoder` embeds every row of a base with a new version in one commit, then makes
  that version active: search filters the weight channel on the active version, so a query never
  ranks vectors of two encoders together.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from registry.lora.errors import RejectedFile
from registry.lora.inspect import load_canonical
from registry.store.encoders import EncoderRecord, active_encoders, get_encoder, set_active
from registry.store.store import Store, quote

BATCH = 16  # LoRAs per encoder forward when re-embedding rows


@dataclass
class EmbedReport:
    """What an embedding pass did: rows embedded per version, rows it could not read."""

    embedded: dict[str, int] = field(default_factory=dict)
    failed: list[dict] = field(default_factory=list)
    activated: str | None = None

    def to_dict(self) -> dict:
        return {"embedded": dict(self.embedded), "failed": list(self.failed), "activated": self.activated}


def load_encoder(record: EncoderRecord):
    """The encoder module of a registered version (torch; imported only when needed), loaded
    once per process: every ingest of a long-lived process (the Python client, a Dagster sensor)
    embeds with the same module instead of reading it again. Callers must not modify it."""
    st = os.stat(record.path)
    return _load_encoder(os.path.realpath(record.path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_encoder(path: str, size: int, mtime_ns: int):  # size and mtime: a rewritten file is read again
    from models.encoder import LoRAWeightEncoder

    return LoRAWeightEncoder.load(path).eval().requires_grad_(False)


@functools.lru_cache(maxsize=4)
def _layer_probes(model) -> dict:  # per loaded encoder (load_encoder keeps a few): not made per ingest
    return model.layer_probes()


class WeightEmbedder:
    """The active encoder of each base model of a registry, loaded on first use."""

    def __init__(self, store: Store, warnings: list[str] | None = None) -> None:
        self.records = active_encoders(store)
        self._models: dict[str, object] = {}
        self._warnings = warnings if warnings is not None else []  # an ingest's report's

    def inputs(self) -> dict[str, dict]:
        """``{version: {layer name: probes}}`` of the active encoders: given to inspection
        (:func:`registry.lora.inspect.inspect_file`), which makes the layers' responses to them in
        its own pass over the factors; :meth:`embed` then starts from those."""
        return {r.version: _layer_probes(model) for r in self.records.values()
                if (model := self._model(r)) is not None}

    def embed(self, base_model: str, factors: Mapping, helper: Executor | None = None,
              responses: Mapping[str, Mapping] | None = None) -> tuple[list[float], str] | None:
        """The weight vector of one LoRA and its encoder version (None: no active encoder);
        ``helper``: an executor whose thread may share the work once free; ``responses``: the
        inspection's ``{version: {layer name: responses}}`` (:meth:`inputs`), if it made them."""
        record = self.records.get(base_model)
        model = self._model(record) if record is not None else None
        if model is None:
            return None
        given = (responses or {}).get(record.version)
        return _encode(model, [factors], helper, [given] if given else None)[0], record.version

    def _model(self, record: EncoderRecord):
        """The loaded encoder of ``record``, or None (said once in the warnings) when its checkpoint
        in the registry is missing or damaged: the LoRAs are then added without a weight vector
        instead of being refused for the registry's fault."""
        if record.version not in self._models:
            try:
                self._models[record.version] = load_encoder(record)
            except Exception as error:  # noqa: BLE001  any failure to read it: not the LoRA's fault
                self._models[record.version] = None
                self._warnings.append(
                    f"the active weight encoder {record.version} ({record.base_model}) could not be read from "
                    f"{record.path} ({type(error).__name__}: {error}); its LoRAs are added without a weight vector: "
                    "put the file back (or register another encoder), then run `autolora embed --registry DIR`")
        return self._models[record.version]


def _encode(model, batch: list[Mapping], helper: Executor | None = None,
            responses: list[Mapping] | None = None) -> list[list[float]]:
    import torch

    from models.torch_threads import one_torch_thread

    with torch.no_grad(), one_torch_thread():  # small matmuls: OpenMP barriers cost more than they give
        return [v.tolist() for v in model(batch, helper=helper, responses=responses).float()]


def _rows_to_embed(store: Store, base_model: str, version: str, only_missing: bool) -> list[dict]:
    where = f"base_model = {quote(base_model)}"
    if only_missing:
        where += f" AND (encoder_version IS NULL OR encoder_version != {quote(version)})"
    n = store.loras.count_rows(where)
    return store.rows(store.loras, where, n, ["lora_id", "blob"]) if n else []


def _embed_rows(store: Store, record: EncoderRecord, rows: list[dict], report: EmbedReport,
                bases: Sequence) -> list[dict]:
    """``{lora_id, weight_vector, encoder_version}`` of ``rows`` (their stored blobs read)."""
    model, out = load_encoder(record), []
    inputs = {record.version: _layer_probes(model)}  # responses made as at ingest: the same vectors
    for start in range(0, len(rows), BATCH):
        batch, responses, ids = [], [], []
        for row in rows[start:start + BATCH]:
            try:
                lora, _ = load_canonical(store.root / row["blob"], bases, inputs)
            except (OSError, ValueError, RejectedFile) as error:  # a blob gone or damaged: reported
                report.failed.append({"lora_id": row["lora_id"], "reason": str(error)})
                continue
            batch.append(lora.factors)
            responses.append(lora.responses[record.version])
            ids.append(row["lora_id"])
        if batch:
            out += [{"lora_id": i, "weight_vector": v, "encoder_version": record.version}
                    for i, v in zip(ids, _encode(model, batch, responses=responses))]
    return out


def _write(store: Store, updates: list[dict]) -> None:
    """One commit updating only the weight columns of existing rows."""
    import pyarrow as pa

    if not updates:
        return
    schema = pa.schema([store.loras.schema.field(n) for n in ("lora_id", "weight_vector", "encoder_version")])
    data = pa.Table.from_pylist(updates, schema=schema)
    from registry.store.store import WRITE_TIMEOUT

    store.loras.merge_insert("lora_id").when_matched_update_all().execute(data, timeout=WRITE_TIMEOUT)


def refresh_embeddings(store: Store, bases: Sequence = ()) -> EmbedReport:
    """Embed every row that lacks its base model's active encoder vector (one commit per base).
    ``bases``: the registry's base models (see :func:`registry.lora.inspect.load_canonical`)."""
    store._writable()
    report = EmbedReport()
    for base_model, record in active_encoders(store).items():
        rows = _rows_to_embed(store, base_model, record.version, only_missing=True)
        updates = _embed_rows(store, record, rows, report, bases)
        _write(store, updates)
        report.embedded[record.version] = len(updates)
    return report


def switch_encoder(store: Store, version: str, bases: Sequence = ()) -> EmbedReport:
    """Embed every row of the version's base model with it (one commit), then make it active.
    Rows ingested meanwhile with the previous version are caught up after the switch."""
    store._writable()
    record = get_encoder(store, version)
    if record is None:
        raise KeyError(f"no encoder version {version!r} in {store.root}")
    report = EmbedReport()
    if not record.active:
        rows = _rows_to_embed(store, record.base_model, version, only_missing=True)
        updates = _embed_rows(store, record, rows, report, bases)
        _write(store, updates)
        report.embedded[version] = len(updates)
        set_active(store, version)
        report.activated = version
    caught_up = refresh_embeddings(store, bases)
    for v, n in caught_up.embedded.items():
        report.embedded[v] = report.embedded.get(v, 0) + n
    report.failed += caught_up.failed
    return report

