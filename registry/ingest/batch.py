"""The rows an ingest has made and not yet written, written together by :meth:`Batch.flush`
(every LanceDB write is a table version: one per batch, not one per file)."""

from __future__ import annotations

import os

from registry.embed import WeightEmbedder
from registry.ingest.report import IngestReport
from registry.ingest.rows import rebuild_row, refreshed_rows
from registry.store.store import Store, where_in
from registry.text import embed_documents


class Batch:
    """Rows waiting to be written together (every write is a table version: batch them)."""

    def __init__(self, reg: Store, report: IngestReport) -> None:
        self.reg, self.report = reg, report
        self.warnings = report.warnings  # broken sidecars met while rows are rebuilt
        self.loras: dict[str, dict] = {}  # new LoRA rows
        self.files: dict[str, dict] = {}  # file records by resolved path
        self.rejections: dict[str, dict] = {}
        self.refresh: set[str] = set()  # LoRAs whose metadata is rebuilt from their sidecars
        self.written: set[str] = set()  # the tables flushes wrote rows to (their indexes are looked at after)
        self._embedder: WeightEmbedder | None = None

    @property
    def embedder(self) -> WeightEmbedder:
        """The registry's active LoRA-weight encoders (read once per ingest)."""
        if self._embedder is None:
            self._embedder = WeightEmbedder(self.reg, self.report.warnings)
        return self._embedder

    def __len__(self) -> int:
        return len(self.loras) + len(self.files) + len(self.rejections)

    def stored_lora(self, lora_id: str) -> dict | None:
        """The row of ``lora_id`` (this batch's or stored), or ``None``. Counted first: a count
        is one LanceDB call (~0.9 ms), a row query ~4 ms, and most LoRAs looked up are new."""
        if lora_id in self.loras:
            return self.loras[lora_id]
        where = where_in("lora_id", [lora_id])
        rows = self.reg.rows(self.reg.loras, where, 1) if self.reg.loras.count_rows(where) else []
        return rows[0] if rows else None

    def file_with_sha(self, sha: str, stored: bool = True) -> dict | None:
        """A file record holding these bytes (``stored=False``: only this batch's are looked at,
        when no stored file has the same size). Counted first, as :meth:`stored_lora` is: most
        files of a size seen before are new bytes (XLabs add: 3-6 ms -> ~1 ms)."""
        hit = next((f for f in self.files.values() if f["sha256"] == sha), None)
        where = where_in("sha256", [sha])
        if hit is None and stored and self.reg.files.count_rows(where):
            rows = self.reg.rows(self.reg.files, where, 1)
            hit = rows[0] if rows else None
        return hit

    def flush(self) -> None:
        reg = self.reg
        self.written |= {name for name, rows in (("loras", self.loras or self.refresh), ("files", self.files),
                                                 ("rejections", self.rejections)) if rows}
        for lora_id in sorted(self.refresh & set(self.loras)):  # a new LoRA met again in this batch
            self._merge_copies(self.loras[lora_id])
        if self.loras:
            rows = list(self.loras.values())
            missing = [row for row in rows if row.get("text_vector") is None]
            for row, vector in zip(missing, embed_documents([r["search_text"] for r in missing])):
                row["text_vector"] = vector
            if reg.upsert(reg.loras, rows, "lora_id", update=False) < len(rows):
                self._settle_races(rows)
        reg.upsert(reg.files, list(self.files.values()), "path", update=True)
        refreshed = refreshed_rows(reg, self.refresh - set(self.loras), self.warnings)
        reg.upsert(reg.loras, refreshed, "lora_id", update=True)  # one version for all of them
        # a path's earlier rejection goes once it holds a LoRA or is rejected anew (other bytes)
        reg.forget_rejections(list(self.files) + [r["path"] for r in self.rejections.values()])
        reg.upsert(reg.rejections, list(self.rejections.values()), "rejection_id", update=True)
        self.loras.clear(), self.files.clear(), self.rejections.clear(), self.refresh.clear()

    def _settle_races(self, rows: list[dict]) -> None:
        """A concurrent ingest stored some of these LoRAs between our look-up and our write (the
        upsert kept its rows): those files are reported as duplicates of its rows, not as added.
        Told by ``added_at``, which no two writers share."""
        ours = {row["lora_id"]: row for row in rows}
        stored = self.reg.rows(self.reg.loras, where_in("lora_id", list(ours)), len(ours),
                               columns=["lora_id", "sha256", "added_at"])
        theirs = {s["lora_id"]: s for s in stored if s["added_at"] != ours[s["lora_id"]]["added_at"]}
        if not theirs:
            return
        for entry in [e for e in self.report.added if e["lora_id"] in theirs]:
            same = theirs[entry["lora_id"]]["sha256"] == ours[entry["lora_id"]]["sha256"]
            self.report.added.remove(entry)
            self.report.duplicates.append({**entry, "kind": "sha256" if same else "fingerprint"})

    def _merge_copies(self, row: dict) -> None:
        """Rebuild a new row of this batch from the sidecars of every copy of it met so far, as a
        later run would (:func:`_refreshed_rows`): which copy came first does not matter."""
        paths = {f["path"] for f in self.files.values() if f["lora_id"] == row["lora_id"]}
        paths |= {f["path"] for f in self.reg.paths_of(row["lora_id"])}  # none, unless a run was killed
        rebuild_row(self.reg, row, [p for p in paths if os.path.exists(p)], self.warnings)
        row["text_vector"] = None  # made at flush, from the merged document
