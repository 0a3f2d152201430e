"""HTTP for sources that are plain REST APIs (Civitai): a ``requests`` session whose retries
(429 with ``Retry-After``, 5xx with exponential back-off) are urllib3's ``Retry``, and a
resumable, size-capped, sha256-verified download.

Written by hand (no library does it): resuming a ``.part`` file with ``Range`` after a cut
connection, and stopping a body that runs past the size promised or the cap.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from pipelines.sources.base import SourceError
from registry.hashing import sha256_file

RETRY_STATUSES = (429, 500, 502, 503, 504)
_CHUNK = 64 * 1024  # small: a cut connection loses at most this much


def make_session(token: str | None = None, retries: int = 4, backoff: float = 0.5,
                 max_retry_after: float = 120.0) -> requests.Session:
    """A session sending ``Authorization: Bearer token`` (requests drops it on a redirect to
    another host, e.g. a CDN) that retries 429/5xx, honouring ``Retry-After`` up to
    ``max_retry_after`` seconds."""
    session = requests.Session()
    retry = _CappedRetry(total=retries, connect=retries, read=retries, status=retries,
                         status_forcelist=RETRY_STATUSES, backoff_factor=backoff,
                         allowed_methods=frozenset({"GET", "HEAD"}), respect_retry_after_header=True,
                         raise_on_status=False)
    retry.max_retry_after = max_retry_after
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


class _CappedRetry(Retry):
    """``Retry`` whose wait for a ``Retry-After`` is capped (a server asking for an hour does
    not stall a crawl: it fails and the candidate is retried at the next sync)."""

    max_retry_after: float = 120.0

    def new(self, **kw):  # urllib3 copies the object on every retry
        new = super().new(**kw)
        new.max_retry_after = self.max_retry_after
        return new

    def get_retry_after(self, response):
        after = super().get_retry_after(response)
        return None if after is None else min(after, self.max_retry_after)


def _status_error(url: str, status: int, auth_hint: str, body: str = "") -> SourceError:
    """``http`` for an error status; a 401/403 carries ``auth_hint`` (e.g. ``set CIVITAI_API_KEY``)."""
    hint = f" ({auth_hint})" if auth_hint and status in (401, 403) else ""
    return SourceError("http", f"{url}: HTTP {status}{hint}" + (f" {body[:200]}" if body else ""), status)


def get_json(session: requests.Session, url: str, params: dict | None = None, timeout: float = 30,
             *, auth_hint: str = "") -> dict:
    """GET JSON; error statuses (after retries) raise :class:`SourceError` (a 401/403 with
    ``auth_hint``)."""
    try:
        response = session.get(url, params=params, timeout=timeout)
    except requests.RequestException as error:
        raise SourceError("network", f"{url}: {error}") from error
    if response.status_code == 404:
        raise SourceError("vanished", f"{url}: 404 not found")
    if response.status_code >= 400:
        raise _status_error(url, response.status_code, auth_hint, response.text)
    try:
        data = response.json()
    except ValueError as error:
        raise SourceError("http", f"{url}: not JSON ({error})") from error
    if not isinstance(data, dict):
        raise SourceError("http", f"{url}: expected a JSON object")
    return data


def download(session: requests.Session, url: str, dest: Path, *, size: int | None = None,
             sha256: str | None = None, max_bytes: int, attempts: int = 4, timeout: float = 60,
             auth_hint: str = "", limit_name: str = "max_bytes") -> Path:
    """Download ``url`` to ``dest`` through ``dest.part`` (resumed with ``Range`` when a previous
    attempt left one). A promised ``size`` over ``max_bytes`` is refused before any request
    (``too_large``, naming ``limit_name``); a body past ``max_bytes`` stops there (``too_large``), one
    past the promised ``size`` or short of it is a ``size_mismatch``, other bytes a ``sha256_mismatch``:
    then the file is deleted and :class:`SourceError` raised (a 401/403 with ``auth_hint``)."""
    if size is not None and size > max_bytes:
        raise SourceError("too_large", f"{dest.name}: {size} bytes promised > {limit_name} {max_bytes}")
    part = dest.with_name(dest.name + ".part")
    limits = _Limits(max_bytes, limit_name, size)
    for attempt in range(attempts):
        have = part.stat().st_size if part.exists() else 0
        if have > limits.most:
            part.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            _stream(session, url, part, have, headers, limits, timeout, auth_hint)
            break
        except SourceError:
            part.unlink(missing_ok=True)
            raise
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as error:
            if attempt == attempts - 1:
                raise SourceError("network", f"{url}: {error}") from error
            time.sleep(min(2 ** attempt * 0.25, 5))
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise SourceError("size_mismatch", f"{url}: got {got} bytes, promised {size}")
    if sha256:
        actual = sha256_file(part)
        if actual.lower() != sha256.lower():
            part.unlink()
            raise SourceError("sha256_mismatch", f"{url}: sha256 {actual} != promised {sha256.lower()}")
    os.replace(part, dest)
    return dest


class _Limits:
    """The cap (``max_bytes``, named ``name`` in messages) and the promised size of one download."""

    def __init__(self, max_bytes: int, name: str, size: int | None) -> None:
        self.max_bytes, self.name, self.size = max_bytes, name, size
        self.most = min(max_bytes, size) if size is not None else max_bytes

    def check(self, url: str, total: int, what: str) -> None:
        """Raise when ``total`` bytes (``what``: how they are known) pass the promise or the cap."""
        if self.size is not None and total > self.size:
            raise SourceError("size_mismatch", f"{url}: {what} {total} bytes, promised {self.size}")
        if total > self.max_bytes:
            raise SourceError("too_large", f"{url}: {what} {total} bytes > {self.name} {self.max_bytes}")


def _stream(session: requests.Session, url: str, part: Path, have: int, headers: dict,
            limits: _Limits, timeout: float, auth_hint: str = "") -> None:
    with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code in (404, 410):
            raise SourceError("vanished", f"{url}: HTTP {response.status_code}", response.status_code)
        if response.status_code == 416 and have:  # the part is already whole
            return
        if response.status_code >= 400:
            raise _status_error(url, response.status_code, auth_hint)
        if have and response.status_code != 206:  # the server ignored Range: start over
            have = 0
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit():
            limits.check(url, have + int(declared), "announced")
        with open(part, "ab" if have else "wb") as handle:
            written = have
            for chunk in response.iter_content(_CHUNK):
                written += len(chunk)
                limits.check(url, written, "at least")
                handle.write(chunk)
