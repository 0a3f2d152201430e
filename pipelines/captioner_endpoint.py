"""Where captions come from: a running OpenAI-compatible server, or a model served by vLLM for the
duration; one description shared by the ``captioner`` Dagster resource and ``autolora caption``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipelines.caption import DEFAULT_PROMPT, Captioner
from pipelines.vllm_server import default_served_name, vllm_server


@dataclass(frozen=True)
class CaptionerEndpoint:
    """``url`` attaches to a running server (left running); otherwise ``model_dir`` (a model folder
    or Hub id) is served by vLLM while connected. ``max_model_len`` / ``dtype`` default to the CPU
    settings for a tiny model (None: vLLM's choice, e.g. a real Qwen2.5-VL on a GPU)."""

    url: str = ""
    model_dir: str = ""
    served_name: str = ""
    max_model_len: int | None = 256
    dtype: str | None = "float32"
    extra_args: Sequence[str] = ()
    prompt: str = DEFAULT_PROMPT
    cache_dir: str = ".autolora/caption-cache"  # "" for none
    concurrency: int = 4
    timeout: float = 120.0
    max_tokens: int = 64
    startup_timeout: float = 600.0

    def model_name(self) -> str | None:
        """The model id captions will carry, when known without asking a server."""
        if self.served_name:
            return self.served_name
        return None if self.url or not self.model_dir else default_served_name(self.model_dir)

    @contextmanager
    def connect(self) -> Iterator[tuple[Captioner, dict]]:
        """A :class:`Captioner` on the endpoint, and ``{base_url, model, pid, start_seconds}``
        (``pid`` None when attached); ``VLLMServerError`` when no server comes up or answers."""
        if not self.url and not self.model_dir:
            raise ValueError("a captioner needs a url (a running OpenAI-compatible server) or a model_dir "
                             "(a model folder or Hub id to serve with vLLM)")
        t0 = time.perf_counter()
        with vllm_server(self.model_dir if not self.url else None, url=self.url or None,
                         served_name=self.served_name or None, startup_timeout=self.startup_timeout,
                         max_model_len=self.max_model_len, dtype=self.dtype, extra_args=list(self.extra_args)) as server:
            info = {"base_url": server.base_url, "model": server.model, "pid": server.pid,
                    "start_seconds": round(time.perf_counter() - t0, 2)}
            with Captioner(server.base_url, server.model, prompt=self.prompt,
                           cache_dir=Path(self.cache_dir) if self.cache_dir else None, concurrency=self.concurrency,
                           timeout=self.timeout, max_tokens=self.max_tokens) as captioner:
                yield captioner, info
