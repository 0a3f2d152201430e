"""Caption images with any OpenAI-compatible vision chat endpoint (e.g. vLLM serving a Qwen-VL).

Each image goes as a PNG data URL in one ``/v1/chat/completions`` request (greedy decoding).
Requests run concurrently in a bounded thread pool; 5xx answers, connection errors and read
time-outs are retried with exponential back-off (urllib3's ``Retry``); captions are cached in
SQLite keyed by (image sha256, model id, prompt), so no image is captioned twice by a model with
a prompt, across calls and processes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests
from PIL import Image
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

DEFAULT_PROMPT = "Describe the image."
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class CaptionError(RuntimeError):
    """Some images could not be captioned (the others were cached)."""


@dataclass(frozen=True)
class Caption:
    """One image's caption: the text, the model that wrote it, the image's sha256, and whether it came from the cache."""

    text: str
    model: str
    image_sha256: str
    cached: bool


def png_bytes(image: Path | bytes) -> bytes:
    """The image as PNG bytes: PNG files and bytes pass through, other formats are re-encoded with Pillow."""
    data = Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)
    if data.startswith(_PNG_MAGIC):
        return data
    buf = io.BytesIO()
    with Image.open(io.BytesIO(data)) as im:
        im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def chat_request(png: bytes, model: str, prompt: str, max_tokens: int) -> dict:
    """The OpenAI chat-completions body asking ``model`` to describe one PNG, greedily."""
    url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }


class CaptionCache:
    """Captions in SQLite (``captions.sqlite`` in a folder), keyed by (image sha256, model, prompt)."""

    def __init__(self, cache_dir: Path):
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(cache_dir) / "captions.sqlite"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS captions (image_sha256 TEXT, model TEXT, prompt TEXT, text TEXT NOT NULL,"
            " PRIMARY KEY (image_sha256, model, prompt))"
        )
        self._db.commit()

    def get(self, sha: str, model: str, prompt: str) -> str | None:
        """The cached caption, or ``None``."""
        with self._lock:
            row = self._db.execute(
                "SELECT text FROM captions WHERE image_sha256=? AND model=? AND prompt=?", (sha, model, prompt)
            ).fetchone()
        return row[0] if row else None

    def put(self, sha: str, model: str, prompt: str, text: str) -> None:
        """Store a caption (the first one stored for a key wins)."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO captions VALUES (?, ?, ?, ?)", (sha, model, prompt, text))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM captions").fetchone()[0]

    def close(self) -> None:
        """Close the database."""
        self._db.close()


class Captioner:
    """Caption images through ``{base_url}/chat/completions`` (``base_url`` ends with ``/v1``)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        prompt: str = DEFAULT_PROMPT,
        cache_dir: Path | None = None,
        concurrency: int = 4,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_tokens: int = 64,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.prompt, self.max_tokens = model, prompt, max_tokens
        self.concurrency, self.timeout = max(1, concurrency), timeout
        self.cache = CaptionCache(cache_dir) if cache_dir is not None else None
        self.requests_made = 0  # chat requests sent (one per uncached image; retries not counted)
        self._count_lock = threading.Lock()
        retry = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=frozenset({"POST"}),
            backoff_factor=backoff,
            raise_on_status=False,
        )
        self._session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry, pool_connections=1, pool_maxsize=self.concurrency)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def caption_one(self, png: bytes) -> str:
        """Ask the endpoint for one PNG's caption (no cache)."""
        with self._count_lock:
            self.requests_made += 1
        body = chat_request(png, self.model, self.prompt, self.max_tokens)
        r = self._session.post(self.url, json=body, timeout=self.timeout)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"].strip()

    def caption(self, images: Sequence[Path | bytes]) -> list[Caption]:
        """Captions of ``images`` in order: cached ones at once, the rest ``concurrency`` requests at a time.

        Raises ``CaptionError`` naming the failures if any request still fails after its retries;
        the captions that succeeded are cached before it is raised.
        """
        pngs = [png_bytes(im) for im in images]
        shas = [hashlib.sha256(p).hexdigest() for p in pngs]
        found: dict[str, tuple[str, bool]] = {}
        todo: dict[str, bytes] = {}
        for sha, png in zip(shas, pngs, strict=True):
            text = self.cache.get(sha, self.model, self.prompt) if self.cache is not None else None
            if text is not None:
                found[sha] = (text, True)
            elif sha not in found:
                todo[sha] = png
        errors: dict[str, Exception] = {}
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo))) as pool:
                futures = {sha: pool.submit(self.caption_one, png) for sha, png in todo.items()}
                for sha, fut in futures.items():
                    try:
                        text = fut.result()
                    except (requests.RequestException, KeyError, IndexError, ValueError) as e:
                        errors[sha] = e
                        continue
                    found[sha] = (text, False)
                    if self.cache is not None:
                        self.cache.put(sha, self.model, self.prompt, text)
        if errors:
            first = next(iter(errors.values()))
            raise CaptionError(f"{len(errors)} of {len(todo)} images not captioned by {self.url}: {first!r}")
        return [Caption(found[s][0], self.model, s, found[s][1]) for s in shas]

    def close(self) -> None:
        """Close the HTTP session and the cache."""
        self._session.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> Captioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
