"""What one ingest did: the ``autolora ingest --json`` contract."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IngestReport:
    """What one ``add`` did; ``to_dict`` is the ``autolora ingest --json`` contract.

    ``added``: LoRAs this ingest stored (of two racing on one LoRA, the one whose row was kept); ``duplicates``: files holding a LoRA already stored (``kind``: the same
    bytes, ``sha256``, or the same weights in another file, ``fingerprint``); ``refreshed``:
    known files whose sidecars changed (their LoRA's metadata was rebuilt); ``unchanged``: known
    files skipped after a stat; ``rejected``: refused files and unreadable paths, with reasons;
    ``warnings``: e.g. a folder holding no candidate file.
    """

    added: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    refreshed: list[dict] = field(default_factory=list)
    unchanged: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"added": self.added, "duplicates": self.duplicates, "refreshed": self.refreshed,
                "unchanged": self.unchanged, "rejected": self.rejected, "warnings": self.warnings}

    def reject(self, path: str, code: str, reason: str) -> None:
        self.rejected.append({"path": path, "reason": reason, "code": code})
