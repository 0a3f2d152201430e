"""Caption images with any OpenAI-compatible vision chat endpoint (e.g. vLLM serving a Qwen-VL).

Each image goes as a PNG data URL in one ``/v1/chat/completions`` request (greedy decoding).
Requests run concurrently on a bounded number of worker threads; 5xx answers, connection errors
and read time-outs are retried with exponential back-off (urllib3's ``Retry``). An endpoint that
refuses connections after those retries, or that stops answering (no caption for ``stall`` seconds
and no answer to ``GET /models``), is *down*: the images not yet captioned fail at once with
:class:`EndpointDown` instead of each waiting out its own retries. Every image is decoded before it
is sent (a render that cannot be decoded is that image's failure, never sent). Captions are cached
in SQLite keyed by (image sha256, model id, prompt), so no image is captioned twice by a model with
a prompt, across calls and processes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sqlite3
import queue
import threading
from collections.abc import Sequence
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


class EndpointDown(CaptionError):
    """The endpoint refuses connections or stopped answering: nothing more can be captioned through it."""


@dataclass(frozen=True)
class Caption:
    """One image's caption: the text, the model that wrote it, the image's sha256, and whether it came
    from the cache."""

    text: str
    model: str
    image_sha256: str
    cached: bool


def png_bytes(image: Path | bytes) -> bytes:
    """The image as PNG bytes: PNG files and bytes pass through (once they decode in full), other
    formats are re-encoded with Pillow. ``ValueError`` naming the file when it does not decode."""
    data = Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)
    buf = io.BytesIO()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # every pixel: verify() alone passes a PNG whose image data is garbage
            if data.startswith(_PNG_MAGIC):
                return data
            im.convert("RGB").save(buf, format="PNG")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        name = Path(image).name if isinstance(image, (str, Path)) else f"{len(data)}-byte image"
        raise ValueError(f"render {name} cannot be decoded as an image ({error}); not sent to the model") from None
    return buf.getvalue()


def _server_message(r: requests.Response) -> str:
    """The error text an OpenAI-compatible server sent with a 4xx/5xx answer (vLLM: ``message``)."""
    try:
        body = r.json()
    except ValueError:
        return r.text.strip()[:300]
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message") if isinstance(error, dict) else None
    return str(message if message else body)[:300]


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


def _reason(error: Exception) -> str:
    """The innermost cause of a requests/urllib3 error, e.g. ``[Errno 111] Connection refused``."""
    text = str(error)
    for marker in ("[Errno", "Read timed out", "Connection aborted", "RemoteDisconnected"):
        if marker in text:
            return text[text.index(marker):].split("'")[0].split('"')[0].rstrip(")( ,") or text
    return text


def describe(error: Exception) -> str:
    """One readable line for a captioning failure (no nested ``MaxRetryError`` reprs)."""
    if isinstance(error, (CaptionError, ValueError, requests.HTTPError)):
        return str(error)
    return f"{type(error).__name__}: {_reason(error)}"


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
        stall: float = 30.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model, self.prompt, self.max_tokens = model, prompt, max_tokens
        self.concurrency, self.timeout, self.stall = max(1, concurrency), timeout, stall
        self.cache = CaptionCache(cache_dir) if cache_dir is not None else None
        self.requests_made = 0  # chat requests sent (one per uncached image; retries not counted)
        self.down: str | None = None  # why the endpoint is down, once it is
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
        """Ask the endpoint for one PNG's caption (no cache). A rejected request raises
        ``requests.HTTPError`` with the server's message; a refused connection marks the endpoint down."""
        if self.down:
            raise EndpointDown(self.down)
        with self._count_lock:
            self.requests_made += 1
        body = chat_request(png, self.model, self.prompt, self.max_tokens)
        try:
            r = self._session.post(self.url, json=body, timeout=self.timeout)
        except requests.ConnectionError as error:  # refused or reset after every retry: nothing listens
            self.down = self.down or f"{self.base_url} refuses connections ({_reason(error)})"
            raise EndpointDown(self.down) from None
        if r.status_code >= 400:
            raise requests.HTTPError(f"{r.status_code} {r.reason} from {self.url}: {_server_message(r)}", response=r)
        return r.json()["choices"][0]["message"]["content"].strip()

    def _probe(self) -> None:
        """Mark the endpoint down unless ``GET /models`` answers within 10 s (a stopped or hung server)."""
        try:
            requests.get(self.base_url + "/models", timeout=min(10.0, self.stall)).raise_for_status()
        except requests.RequestException as error:
            self.down = self.down or (f"{self.base_url} stopped answering: no caption for {self.stall:.0f} s "
                                      f"and no answer to GET /models ({_reason(error)})")

    def results(self, images: Sequence[Path | bytes]) -> list[Caption | Exception]:
        """Each image's :class:`Caption`, or the exception that kept it from one (an image that does
        not decode, a rejected request, :class:`EndpointDown`); cached captions at once, the rest
        ``concurrency`` requests at a time. New captions are cached as they come."""
        outcome: list[tuple[str, bytes] | Exception] = []
        for image in images:
            try:
                png = png_bytes(image)
                outcome.append((hashlib.sha256(png).hexdigest(), png))
            except (OSError, ValueError) as error:
                outcome.append(error)
        found: dict[str, Caption | Exception] = {}
        todo: dict[str, bytes] = {}
        for item in outcome:
            if isinstance(item, Exception) or item[0] in found or item[0] in todo:
                continue
            text = self.cache.get(item[0], self.model, self.prompt) if self.cache is not None else None
            if text is not None:
                found[item[0]] = Caption(text, self.model, item[0], True)
            else:
                todo[item[0]] = item[1]
        found.update(self._request_all(todo))
        return [item if isinstance(item, Exception) else found[item[0]] for item in outcome]

    def _request_all(self, todo: dict[str, bytes]) -> dict[str, Caption | Exception]:
        """Captions of ``todo`` ({sha: png}) from daemon worker threads (a hung request never holds up
        the process's exit); once the endpoint is down, the rest fail with :class:`EndpointDown`."""
        done: dict[str, Caption | Exception] = {}
        if not todo:
            return done
        jobs: queue.SimpleQueue = queue.SimpleQueue()
        for item in todo.items():
            jobs.put(item)
        changed = threading.Condition()

        def work() -> None:
            while not self.down:
                try:
                    sha, png = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    got: Caption | Exception = Caption(self.caption_one(png), self.model, sha, False)
                    if self.cache is not None:
                        self.cache.put(sha, self.model, self.prompt, got.text)
                except Exception as e:  # noqa: BLE001  any failure is this image's; a dying worker would hang the wait
                    got = e
                with changed:
                    done[sha] = got
                    changed.notify()

        for _ in range(min(self.concurrency, len(todo))):
            threading.Thread(target=work, daemon=True, name="captioner").start()
        with changed:
            while len(done) < len(todo) and not self.down:
                before = len(done)
                changed.wait(timeout=self.stall)
                if len(done) == before and not self.down:
                    self._probe()
            down = EndpointDown(self.down or "")
            return {sha: done.get(sha, down) for sha in todo}

    def caption(self, images: Sequence[Path | bytes]) -> list[Caption]:
        """Captions of ``images`` in order (see :meth:`results`). Raises ``CaptionError`` (``EndpointDown``
        when the endpoint is down) naming the failures if any image failed; the captions that
        succeeded are cached before it is raised."""
        got = self.results(images)
        errors = [c for c in got if isinstance(c, Exception)]
        if errors:
            kind = EndpointDown if any(isinstance(e, EndpointDown) for e in errors) else CaptionError
            raise kind(f"{len(errors)} of {len(got)} images not captioned by {self.url}: {describe(errors[0])}")
        return got  # type: ignore[return-value]

    def close(self) -> None:
        """Close the HTTP session and the cache."""
        self._session.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> Captioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
