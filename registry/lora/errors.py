"""The one exception type for files the registry refuses."""

from __future__ import annotations


class RejectedFile(Exception):
    """A file that is not accepted into the registry, with a human-readable reason.

    ``code`` is a short stable slug (e.g. ``"pickle"``, ``"nan_inf"``) that tests and reports
    can rely on; ``reason`` is the sentence shown to users.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
