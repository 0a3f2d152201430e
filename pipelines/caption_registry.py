"""Caption every sample render of a registry's LoRAs through an OpenAI-compatible endpoint.

Incremental: a LoRA is (re)captioned when its ``caption_model`` is not the captioner's model or
its captions do not pair one-to-one with its renders (e.g. a new preview arrived). Rows go in
batches: their images through :class:`pipelines.caption.Captioner` (concurrent requests, SQLite
cache: an image is never sent twice for a model and prompt), then one
:meth:`registry.Registry.set_captions` write per batch.

**Self-rendered renders** (beyond the paper): a LoRA that arrived without any sample render gets
``n_renders`` made by its base model with the LoRA active (neutral prompts, prefixed by its
trigger words when known; seeded by its id, so a rerun makes the same images), stored in the
blob store as ``render_blobs`` whose prompts start with ``registry.captions.SELF_RENDERED``,
and captioned like the others. The base pipelines come as ``{base_model: FluxPipeline or its
folder}``; a LoRA of a base without one is reported as skipped, never guessed at.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.caption import Caption, Captioner, EndpointDown, describe
from registry import Registry
from registry.captions import SELF_RENDERED
from registry.store.search import NOT_REMOVED
from registry.store.store import where_in
from registry.lora.errors import RejectedFile

NEUTRAL_PROMPTS = ("", "an image", "a picture")  # nothing about content: the LoRA decides it
_COLUMNS = ["lora_id", "name", "base_model", "blob", "trigger_words", "render_prompts", "render_blobs",
            "captions", "caption_model"]


@dataclass
class CaptionReport:
    """What one :func:`caption_registry` pass did.

    ``captioned``: LoRAs whose captions were written; ``images``: renders captioned, ``requests`` of
    them by the endpoint and ``cached`` from the cache (``images == requests + cached``);
    ``self_rendered``: ``{lora_id: renders made}``; ``skipped``/``failed``: ``{lora_id, name,
    reason}`` (failed ones are retried by the next pass); ``stopped``: why the pass stopped early
    (the endpoint went down; "" when it ran to the end), with ``left`` LoRAs not captioned for that
    (a rerun does them); seconds spent captioning and rendering."""

    model: str
    captioned: int = 0
    up_to_date: int = 0
    images: int = 0
    requests: int = 0
    cached: int = 0
    self_rendered: dict[str, int] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    writes: int = 0
    stopped: str = ""
    left: int = 0
    caption_seconds: float = 0.0
    render_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Captioning throughput over the images sent (0 when none was sent)."""
        return self.requests / self.caption_seconds if self.requests and self.caption_seconds else 0.0

    def to_dict(self) -> dict:
        """JSON-able summary."""
        return {**asdict(self), "images_per_second": self.images_per_second}


Renderer = Callable[[Any, Mapping, Sequence[str], int], Any]  # (pipe, layers, prompts, seed) -> (N,H,W,3) uint8


def render_with_base(pipe: Any, layers: Mapping, prompts: Sequence[str], seed: int) -> Any:
    """Images of ``prompts`` from a FLUX pipeline with the canonical LoRA ``layers`` active."""
    from models.torch_threads import one_torch_thread
    from pipelines.world.sampling import generate, lora_active

    with one_torch_thread(), lora_active(pipe, layers, name="self-render"):
        return generate(pipe, list(prompts), seed)


def self_render_prompts(trigger_words: Sequence[str], n: int) -> list[str]:
    """``n`` neutral prompts, each led by the trigger words when there are any."""
    trigger = ", ".join(w for w in trigger_words if w)
    prompts = [", ".join(p for p in (trigger, neutral) if p) for neutral in NEUTRAL_PROMPTS]
    return [prompts[i % len(prompts)] for i in range(n)]


class _Bases:
    """Base pipelines by base-model name, folders loaded on first use."""

    def __init__(self, given: Mapping[str, Any] | None) -> None:
        self.given, self.loaded = dict(given or {}), {}

    def get(self, name: str | None) -> Any | None:
        if not name or name not in self.given:
            return None
        if name not in self.loaded:
            from pipelines.generate import load_base  # a folder, demo world or Hub id, loaded quietly

            self.loaded[name] = load_base(self.given[name])
        return self.loaded[name]


def render_seed(lora_id: str, seed: int = 0) -> int:
    """The seed of a LoRA's self-rendered images (stable across runs, distinct per LoRA)."""
    return (int(hashlib.sha256(lora_id.encode()).hexdigest()[:8], 16) + seed) % (1 << 31)


def _store_png(reg: Registry, image: Any) -> str:
    """One uint8 image into the blob store as PNG; its path relative to the registry root."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    data = buffer.getvalue()
    with tempfile.NamedTemporaryFile(dir=reg.blobs.root, prefix=".render-", suffix=".png") as tmp:
        tmp.write(data)
        tmp.flush()
        blob = reg.blobs.put(tmp.name, hashlib.sha256(data).hexdigest(), ".png")
    return blob.relative_to(reg.root).as_posix()


def _needs_captions(row: dict, model: str) -> bool:
    return row["caption_model"] != model or len(row["captions"] or []) != len(row["render_blobs"] or [])


def _has_image(reg: Registry, blob: str) -> bool:
    return bool(blob) and (reg.root / blob).is_file()


def _no_render(row: dict, self_render: bool) -> dict:
    """The skip record of a LoRA with no render image that nothing can render."""
    why = ("self-rendering is off" if not self_render
           else f"no pipeline for its base {row['base_model']!r} to render one (autolora caption --base "
                f"{row['base_model']}=PIPELINE; base_pipelines in Python and Dagster)")
    return _problem(row, f"no sample render image; {why}")


def _problem(row: dict, reason: str) -> dict:
    """A skipped or failed record: the LoRA's id and name, and the reason."""
    return {"lora_id": row["lora_id"], "name": row.get("name") or "", "reason": reason}


class _Stopped(Exception):
    """The endpoint went down: the pass ends after writing what it captioned."""


class _Pass:
    """One captioning pass over a registry (state shared by its batches)."""

    def __init__(self, reg: Registry, captioner: Captioner, bases: _Bases, self_render: bool, n_renders: int,
                 seed: int, renderer: Renderer, report: CaptionReport) -> None:
        self.reg, self.captioner, self.bases = reg, captioner, bases
        self.self_render, self.n_renders, self.seed, self.renderer = self_render, n_renders, seed, renderer
        self.report = report

    def renders_of(self, row: dict) -> tuple[list[str], list[str]] | None:
        """The row's (prompts, blobs), with self-rendered ones added when it has no image; None: skip it."""
        prompts, blobs = list(row["render_prompts"] or []), list(row["render_blobs"] or [])
        if any(_has_image(self.reg, b) for b in blobs):
            return prompts, blobs
        try:
            pipe = self.bases.get(row["base_model"]) if self.self_render else None
        except OSError as error:  # a base that does not load (a folder gone, a Hub id not cached)
            self.report.failed.append(_problem(row, f"self-render failed: {error}"))
            return None
        if pipe is None:
            self.report.skipped.append(_no_render(row, self.self_render))
            return None
        new_prompts = self_render_prompts(row["trigger_words"] or [], self.n_renders)
        t0 = time.perf_counter()
        try:
            lora = self._canonical(row)
            images = self.renderer(pipe, lora.layers, new_prompts, render_seed(row["lora_id"], self.seed))
        except (OSError, ValueError, RejectedFile, RuntimeError) as error:  # a bad blob or a base mismatch
            self.report.failed.append(_problem(row, f"self-render failed: {error}"))
            return None
        finally:
            self.report.render_seconds += time.perf_counter() - t0
        new_blobs = [_store_png(self.reg, image) for image in images]
        self.report.self_rendered[row["lora_id"]] = len(new_blobs)
        return prompts + [SELF_RENDERED + p for p in new_prompts], blobs + new_blobs

    def _canonical(self, row: dict):
        from registry.lora.inspect import load_canonical

        return load_canonical(self.reg.root / row["blob"], self.reg.bases())[0]

    def caption(self, rows: list[dict]) -> None:
        """Caption ``rows`` and write them in one registry write; raises :class:`_Stopped` after
        that write when the endpoint went down (the LoRAs it kept from captions count as ``left``)."""
        plans, by_id = {}, {r["lora_id"]: r for r in rows}
        for row in rows:
            if self.captioner.down:
                self.report.left += 1
                continue
            renders = self.renders_of(row)
            if renders is not None:
                plans[row["lora_id"]] = renders
        texts = self._captions(plans, by_id)
        updates = {i: (texts[i], self.captioner.model) for i in plans if i in texts}
        if updates:  # a row an ingest refreshed meanwhile is left alone (its new renders kept)
            seen = {i: (by_id[i]["render_prompts"] or [], by_id[i]["render_blobs"] or []) for i in updates}
            written = self.reg.set_captions(updates, renders={i: plans[i] for i in updates}, seen=seen)
            self.report.captioned += written
            self.report.writes += bool(written)
            if written < len(updates):
                self._changed_meanwhile(updates)
        if self.captioner.down:
            raise _Stopped(self.captioner.down)

    def _changed_meanwhile(self, updates: dict) -> None:
        """Report the rows :meth:`caption` did not write because their renders changed meanwhile."""
        stored = self.reg.rows(self.reg.loras, where_in("lora_id", sorted(updates)), len(updates),
                               ["lora_id", "name", "caption_model"])
        for row in stored:
            if row["caption_model"] != self.captioner.model:
                self.report.skipped.append(_problem(row, "its renders changed while it was captioned (an ingest "
                                                         "refreshed it): the next pass captions it"))

    def _captions(self, plans: dict[str, tuple[list[str], list[str]]],
                  rows: dict[str, dict]) -> dict[str, list[str]]:
        """Captions per LoRA, one per render ("" for a render without an image), from one
        :meth:`Captioner.results` call for the whole batch: a render that fails fails its LoRA
        (with the reason), one the endpoint being down kept from a caption leaves it for a rerun."""
        wanted = {i: [b for b in blobs if _has_image(self.reg, b)] for i, (_, blobs) in plans.items()}
        got = self._ask([b for blobs in wanted.values() for b in blobs])
        texts = {}
        for lora_id, blobs in wanted.items():
            errors = [got[b] for b in blobs if isinstance(got[b], Exception)]
            if not errors:
                texts[lora_id] = [got[b].text if b in got else "" for b in plans[lora_id][1]]
            elif any(isinstance(e, EndpointDown) for e in errors):
                self.report.left += 1
            else:
                self.report.failed.append(_problem(rows[lora_id], f"captioning failed: {describe(errors[0])}"))
        return texts

    def _ask(self, blobs: list[str]) -> dict[str, Caption | Exception]:
        """Each blob's caption or failure; counts the renders captioned, by request or from the cache."""
        if not blobs:
            return {}
        t0 = time.perf_counter()
        try:
            results = self.captioner.results([self.reg.root / b for b in blobs])
        finally:
            self.report.caption_seconds += time.perf_counter() - t0
        requested: set[str] = set()
        for result in results:
            if isinstance(result, Caption):
                self.report.images += 1
                if not result.cached and result.image_sha256 not in requested:  # a duplicate is sent once
                    requested.add(result.image_sha256)
                    self.report.requests += 1
                else:
                    self.report.cached += 1
        return dict(zip(blobs, results, strict=True))


def _rows(reg: Registry) -> list[dict]:
    where = NOT_REMOVED
    n = reg.loras.count_rows(where)
    return sorted(reg.rows(reg.loras, where, n, _COLUMNS) if n else [], key=lambda r: r["lora_id"])


def pending_captions(reg: Registry, model: str, base_pipelines: Mapping[str, Any] | None = None,
                     self_render: bool = True) -> int:
    """How many LoRAs a :func:`caption_registry` pass with these arguments would caption: those
    lacking ``model``'s captions that have a render image, or whose base can render one (a LoRA
    it could only skip does not count, so it starts no server on every run)."""
    can_render = set(base_pipelines or {}) if self_render else set()
    return sum(_needs_captions(r, model) and (r["base_model"] in can_render
                                              or any(_has_image(reg, b) for b in r["render_blobs"] or []))
               for r in _rows(reg))


def idle_report(reg: Registry, model: str, self_render: bool = True) -> CaptionReport:
    """The report of a pass with nothing to caption (:func:`pending_captions` 0), made without a
    captioner: LoRAs with ``model``'s captions are up to date, the others skipped with the
    reason a pass would give."""
    report = CaptionReport(model=model)
    for row in _rows(reg):
        if _needs_captions(row, model):
            report.skipped.append(_no_render(row, self_render))
        else:
            report.up_to_date += 1
    return report


def caption_registry(reg: Registry, captioner: Captioner, *, base_pipelines: Mapping[str, Any] | None = None,
                     self_render: bool = True, n_renders: int = 3, seed: int = 0, batch_size: int = 64,
                     renderer: Renderer = render_with_base) -> CaptionReport:
    """Caption the renders of every LoRA that lacks captions of ``captioner.model`` (removed
    LoRAs left alone); LoRAs without any render image are rendered by their base first when
    ``self_render`` and ``base_pipelines`` has it. One registry write per ``batch_size`` LoRAs.
    Raises ``RegistryNotWritable`` before any work on a registry it cannot write to. When the
    endpoint goes down the pass writes what it has and stops (``report.stopped``, ``report.left``)."""
    if n_renders < 1 or batch_size < 1:
        raise ValueError(f"n_renders and batch_size must be positive, not {n_renders} and {batch_size}")
    reg.check_writable()  # RegistryNotWritable before any work, not a lance error after a batch
    t0 = time.perf_counter()
    report = CaptionReport(model=captioner.model)
    rows = _rows(reg)
    todo = [r for r in rows if _needs_captions(r, captioner.model)]
    report.up_to_date = len(rows) - len(todo)
    run = _Pass(reg, captioner, _Bases(base_pipelines), self_render, n_renders, seed, renderer, report)
    for start in range(0, len(todo), batch_size):
        try:
            run.caption(todo[start:start + batch_size])
        except _Stopped as stop:
            report.left += max(0, len(todo) - start - batch_size)
            report.stopped = str(stop)
            break
    report.seconds = time.perf_counter() - t0
    return report
