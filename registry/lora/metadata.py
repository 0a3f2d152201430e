"""Text metadata of a LoRA: from the safetensors header and from sidecar files beside it.

Header: kohya ``ss_*`` keys (``ss_output_name``, ``ss_tag_frequency``, ``ss_base_model_version``…)
and ``modelspec.*`` keys. Sidecars next to ``NAME.safetensors`` (all optional):
``NAME.json`` (a card: name, description, trigger words / "activation text", tags, renders with
their prompts), ``NAME.civitai.info`` (a Civitai model-version JSON), preview images
``NAME.png`` / ``NAME.preview.png`` / ``NAME.*.png`` whose prompt sits in the PNG text chunk
(``parameters`` or ``prompt``) or in ``IMAGE.txt``.

Sidecars are third-party content: a sidecar is read only when it is a regular file (links
followed; never a FIFO or a device) and at most ``cap + 1`` of its bytes are read. An image is a
render only when it passes :func:`_image_problem` (and, named by a card, lies in the LoRA's folder);
only those are ever copied (:attr:`LoraMetadata.render_images`). A ``.civitai.info`` URL is a link,
never a local path. Whatever is ignored gives a warning naming the file and why; never an error.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_MAX_SIDECAR_BYTES = 4 * 1024 * 1024
MAX_RENDER_BYTES = 32 * 1024 * 1024  # a render image bigger than this is ignored, never copied
MAX_RENDER_PIXELS = 8192 * 8192  # decoded to check it: bounds the memory that takes (~200 MB RGB)
_RENDER_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # the only decoders PIL may use on a sidecar image


@dataclass
class LoraMetadata:
    """Everything textual we know about one LoRA."""

    name: str = ""
    aliases: list[str] = field(default_factory=list)  # other names it goes by (searchable, not shown)
    description: str = ""
    trigger_words: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    base_model_hint: str = ""
    render_paths: list[str] = field(default_factory=list)
    render_prompts: list[str] = field(default_factory=list)
    licence: str = ""
    nsfw_level: str = ""  # as the source states it (Civitai: None/Soft/Mature/X or a number)
    source_url: str = ""  # where it was downloaded from
    # the render paths checked as images (see _image_problem): the only ones ever copied
    render_images: set[str] = field(default_factory=set)
    # the list warnings went to when these sidecars were read: a render that cannot be copied later
    # (registry.ingest.rows.store_renders) is reported there too
    warnings: list[str] | None = field(default=None, repr=False, compare=False)

    def search_text(self) -> str:
        """The document indexed for full-text and text-embedding search, one text per line
        (:func:`registry.text.embed_documents` embeds each line)."""
        parts = [self.name, *self.aliases, " ".join(self.trigger_words), self.description, *self.tags]
        parts += self.render_prompts
        return "\n".join(p for p in parts if p)

    def update(self, other: "LoraMetadata") -> None:
        """Fill empty fields from ``other``; lists are merged without repeats."""
        for name in ("name", "description", "base_model_hint", "licence", "nsfw_level", "source_url"):
            if not getattr(self, name) and getattr(other, name):
                setattr(self, name, getattr(other, name))
        for name in ("trigger_words", "tags"):
            mine = getattr(self, name)
            mine.extend(x for x in getattr(other, name) if x and x not in mine)
        for path, prompt in zip(other.render_paths, other.render_prompts):
            if path not in self.render_paths:
                self.render_paths.append(path)
                self.render_prompts.append(prompt)
                if path in other.render_images:
                    self.render_images.add(path)
        if self.warnings is None:
            self.warnings = other.warnings


def _plain(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def header_then_sidecars(header: LoraMetadata, sidecars: LoraMetadata, stem: str = "") -> LoraMetadata:
    """``header`` (from :func:`from_header`) filled from ``sidecars`` (read with ``name_from_stem``
    off), in place. A name a card or source page gives wins over the header's (often the training
    run's output file name, ``ss_output_name``) where they differ in more than case and
    punctuation; the header's stays searchable as an alias. ``stem`` names it when nothing does."""
    header_name = header.name
    header.update(sidecars)
    if header_name and sidecars.name and _plain(sidecars.name) != _plain(header_name):
        header.name = sidecars.name
        header.aliases.append(header_name)
    if not header.name:
        header.name = stem
    return header


def _split_words(value: object) -> list[str]:
    if isinstance(value, str):
        return [w.strip() for w in value.replace("\n", ",").split(",") if w.strip()]
    if isinstance(value, list):
        return [str(w).strip() for w in value if str(w).strip()]
    return []


def from_header(metadata: dict[str, str]) -> LoraMetadata:
    """Read kohya ``ss_*`` and ``modelspec.*`` keys of a safetensors header."""
    meta = LoraMetadata(
        name=metadata.get("modelspec.title") or metadata.get("ss_output_name", ""),
        description=metadata.get("modelspec.description", "") or metadata.get("ss_training_comment", ""),
        trigger_words=_split_words(metadata.get("modelspec.trigger_phrase", "")),
        tags=_split_words(metadata.get("modelspec.tags", "")),
        base_model_hint=metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture", ""),
    )
    try:
        frequencies = json.loads(metadata.get("ss_tag_frequency", "") or "{}")
    except (ValueError, RecursionError):  # not JSON, or nested too deep to read
        frequencies = {}
    counts: dict[str, int] = {}
    if isinstance(frequencies, dict):
        for per_dataset in frequencies.values():
            if isinstance(per_dataset, dict):
                for tag, count in per_dataset.items():
                    if isinstance(count, (int, float)) and math.isfinite(count):  # (JSON allows NaN, Infinity)
                        counts[str(tag).strip()] = counts.get(str(tag).strip(), 0) + int(count)
    meta.tags += [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:50] if t not in meta.tags]
    return meta


class _Unusable(Exception):
    """A sidecar that is no regular file, or too big: the message says which."""


def _open_regular(path: Path, cap: int) -> BinaryIO:
    """``path`` opened for binary reads when it is a regular file (links followed) of at most
    ``cap`` bytes, else :class:`_Unusable`. Checked before and after opening, and opened without
    blocking: a FIFO or device under a sidecar's name is never waited on nor read."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise _Unusable("not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Unusable("not a regular file")
        if info.st_size > cap:
            raise _Unusable(f"over {cap:,} bytes")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_capped(path: Path, cap: int) -> bytes:
    """The bytes of the regular file ``path``: at most ``cap + 1`` are read (:func:`_open_regular`)."""
    with _open_regular(path, cap) as handle:
        data = handle.read(cap + 1)
    if len(data) > cap:  # it grew since its size was checked
        raise _Unusable(f"over {cap:,} bytes")
    return data


def _load_json(path: Path, warnings: list[str] | None) -> dict:
    """A sidecar's JSON object; ``{}`` (and a warning naming the file) when it is none."""
    try:
        data = json.loads(_read_capped(path, _MAX_SIDECAR_BYTES).decode("utf-8"))
    except _Unusable as error:
        return _ignored(path, str(error), warnings)
    except OSError as error:
        return _ignored(path, f"unreadable: {error.strerror or error}", warnings)
    except UnicodeDecodeError:
        return _ignored(path, "not UTF-8 text", warnings)
    except json.JSONDecodeError as error:
        return _ignored(path, f"invalid JSON ({error})", warnings)
    except RecursionError:
        return _ignored(path, "invalid JSON (nested too deeply)", warnings)
    return data if isinstance(data, dict) else _ignored(path, "not a JSON object", warnings)


def _ignored(path: Path, reason: str, warnings: list[str] | None) -> dict:
    """Record that the sidecar at ``path`` was ignored (once per message); its metadata is empty."""
    _warn(warnings, f"ignored sidecar {path}: {reason}")
    return {}


def _warn(warnings: list[str] | None, message: str) -> None:
    """Append ``message`` to ``warnings`` (when given) unless it is there already."""
    if warnings is not None and message not in warnings:
        warnings.append(message)


def _image_problem(path: Path) -> str:
    """Why the image at ``path`` cannot be a render (``""`` when it can): it must be a regular
    file (links followed) of at most :data:`MAX_RENDER_BYTES` that PIL identifies as a PNG, JPEG,
    WebP or GIF, verifies and decodes (``verify`` checks a PNG's chunk checksums, not that its
    pixel data inflates: a render that cannot be decoded would be captioned from nothing; a JPEG
    is decoded at 1/8 scale, which reads every block). ``"missing"`` when there is no file (a
    render gone: no warning)."""
    try:
        handle = _open_regular(path, MAX_RENDER_BYTES)
    except FileNotFoundError:
        return "missing"
    except _Unusable as error:
        return str(error)
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    with handle:
        try:
            from PIL import Image

            with Image.open(handle, formats=_RENDER_FORMATS) as image:
                image.verify()
            handle.seek(0)
            with Image.open(handle, formats=_RENDER_FORMATS) as image:  # verify() leaves it unusable
                if image.width * image.height > MAX_RENDER_PIXELS:
                    return f"{image.width}x{image.height} pixels, over the {MAX_RENDER_PIXELS:,} a render may have"
                image.draft("RGB", (image.width // 8 or 1, image.height // 8 or 1))  # JPEG only: a cheap decode
                image.load()
        except Exception as error:  # PIL raises many kinds on broken or hostile bytes
            return f"not a readable PNG, JPEG, WebP or GIF image ({type(error).__name__})"
    return ""


def _image_prompt(image: Path, checked: bool = True) -> str:
    """The prompt of a preview: its ``IMAGE.txt``, else (``checked``: the image passed
    :func:`_image_problem`) its PNG text chunk; ``""`` when neither can be read."""
    text_file = image.with_suffix(".txt")
    try:
        if text_file.is_file() and text_file.stat().st_size < _MAX_SIDECAR_BYTES:  # is_file: S_ISREG
            return text_file.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:  # an unreadable prompt file loses the prompt, never the LoRA
        return ""
    if not checked:
        return ""
    try:
        from PIL import Image

        with _open_regular(image, MAX_RENDER_BYTES) as handle, Image.open(handle, formats=_RENDER_FORMATS) as img:
            chunks = getattr(img, "text", {}) or {}
            return str(chunks.get("parameters") or chunks.get("prompt") or "").split("\nNegative prompt:")[0].strip()
    except Exception:  # an unreadable preview loses its prompt, never the LoRA
        return ""


def _shown(value: object) -> str:
    """A value from a sidecar as a warning shows it: quoted, on one line, at most 200 characters."""
    text = repr(str(value))
    return text if len(text) <= 200 else text[:197] + "..."


def _card_render(raw: object, lora_path: Path, card: Path, warnings: list[str] | None) -> tuple[str, bool]:
    """The path of a card's render image ``raw`` (relative to the card's folder) and whether it
    may be copied: only when it resolves (links followed) inside the LoRA's folder (that of its
    path, or of the file it links to), has an image suffix and passes :func:`_image_problem`.
    Otherwise a warning naming it and why (none when it is just missing)."""
    folder = lora_path.parent
    try:
        target = os.path.realpath(folder / str(raw))
        roots = {os.path.realpath(folder), os.path.dirname(os.path.realpath(lora_path))}
    except (OSError, ValueError):  # e.g. a NUL in the name
        reason, target = "not a valid path", str(folder / str(raw).replace("\0", ""))
    else:
        if not any(Path(target).is_relative_to(root) for root in roots):
            reason = "outside the LoRA's folder"
        elif Path(str(raw)).suffix.lower() not in _IMAGE_SUFFIXES:
            reason = f"not an image file name ({', '.join(_IMAGE_SUFFIXES)})"
        else:
            reason = _image_problem(Path(target))
    if reason and reason != "missing":
        _warn(warnings, f"ignored render {_shown(raw)} of {card}: {reason}")
    return target, not reason


def _from_card(card: dict, lora_path: Path, card_path: Path, warnings: list[str] | None) -> LoraMetadata:
    meta = LoraMetadata(
        name=str(card.get("name") or card.get("model_name") or ""),
        description=str(card.get("description") or card.get("notes") or ""),
        trigger_words=_split_words(card.get("trigger_words") or card.get("activation text") or ""),
        tags=_split_words(card.get("tags") or ""),
        base_model_hint=str(card.get("base_model") or card.get("sd version") or ""),
        licence=str(card.get("licence") or card.get("license") or ""),
        nsfw_level=str(card.get("nsfw_level") if card.get("nsfw_level") is not None else ""),
        source_url=str(card.get("source_url") or ""),
    )
    for render in card.get("renders") or []:
        if isinstance(render, dict) and render.get("image"):
            path, ok = _card_render(render["image"], lora_path, card_path, warnings)
            meta.render_paths.append(path)
            meta.render_prompts.append(str(render.get("prompt") or ""))
            if ok:
                meta.render_images.add(path)
    return meta


def _from_civitai(info: dict, info_path: Path, warnings: list[str] | None) -> LoraMetadata:
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    meta = LoraMetadata(
        name=str(model.get("name") or info.get("name") or ""),
        description=str(info.get("description") or model.get("description") or ""),
        trigger_words=_split_words(info.get("trainedWords") or []),
        tags=_split_words(model.get("tags") or []),
        base_model_hint=str(info.get("baseModel") or ""),
        nsfw_level=str(model.get("nsfwLevel") if model.get("nsfwLevel") is not None else
                       ("true" if model.get("nsfw") else "")),
    )
    for image in info.get("images") or []:
        prompt = (image.get("meta") or {}).get("prompt") if isinstance(image, dict) else None
        if prompt:  # its URL is a link: never read as a local path (never in render_images)
            url = str(image.get("url") or "")
            if url and not url.lower().startswith(("http://", "https://")):
                _warn(warnings, f"ignored render {_shown(url)} of {info_path}: not an http(s) URL")
            meta.render_paths.append(url)
            meta.render_prompts.append(str(prompt))
    return meta


def sidecar_files(lora_path: str | os.PathLike, siblings: Sequence[str] | None = None) -> list[Path]:
    """The sidecar files of ``lora_path`` that exist: its card, ``.civitai.info``, previews and
    their prompt ``.txt`` files. ``siblings``: the sorted names in its folder, when the caller
    has listed the folder already (a walk of a big flat folder would otherwise list it per file).
    """
    path = Path(lora_path)
    folder, stem = path.parent, _stem(path)
    if siblings is None:
        try:
            siblings = sorted(os.listdir(folder))
        except OSError:
            return []
    start = bisect.bisect_left(siblings, stem)
    found = []
    for name in itertools.takewhile(lambda n: n.startswith(stem), siblings[start:]):
        rest = name[len(stem):]
        if rest in (".json", ".civitai.info") or (
                rest.startswith(".") and Path(name).suffix.lower() in _IMAGE_SUFFIXES + (".txt",)):
            found.append(folder / name)
    return found


def sidecar_signature(files: Iterable[Path]) -> str:
    """A short digest of the names, sizes and mtimes of ``files`` (a stat each, no reads):
    it changes when a sidecar is added, removed or rewritten."""
    parts = []
    for file in sorted(files):
        try:
            stat = file.stat()
        except OSError:
            continue
        parts.append(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16] if parts else ""


def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def _parsed(path: Path | None, parse, warnings: list[str] | None, *args) -> LoraMetadata:
    """``parse(json object of path, *args)``; empty metadata when the file is missing, broken or
    not shaped as expected (e.g. a list where an object belongs): then with a warning."""
    if path is None:
        return LoraMetadata()
    try:
        return parse(_load_json(path, warnings), *args)
    except (AttributeError, TypeError, ValueError, RecursionError) as error:
        _ignored(path, f"unexpected content ({type(error).__name__}: {error})", warnings)
        return LoraMetadata()


def from_sidecars(lora_path: str | os.PathLike, siblings: Sequence[str] | None = None,
                  name_from_stem: bool = True, warnings: list[str] | None = None) -> LoraMetadata:
    """Collect metadata from the files next to ``lora_path``; missing ones are skipped, broken
    ones too, with a line naming the file and why appended to ``warnings`` (once per message).
    A render whose image is refused keeps its prompt, without an image (as a link's does).
    Without a name anywhere, the file's stem is the name (unless ``name_from_stem`` is off)."""
    path = Path(lora_path)
    stem = _stem(path)
    files = {p.name: p for p in sidecar_files(path, siblings)}
    card, info = files.get(f"{stem}.json"), files.get(f"{stem}.civitai.info")
    meta = _parsed(card, _from_card, warnings, path, card, warnings)
    meta.update(_parsed(info, _from_civitai, warnings, info, warnings))
    previews_meta = LoraMetadata()
    for image in sorted(p for p in files.values() if p.suffix.lower() in _IMAGE_SUFFIXES):
        resolved = os.path.realpath(image)
        if resolved not in meta.render_paths:
            problem = _image_problem(image)
            if problem and problem != "missing":  # kept as a render without image: its prompt stays
                _warn(warnings, f"ignored render {image}: {problem}")
            previews_meta.render_paths.append(resolved)
            previews_meta.render_prompts.append(_image_prompt(image, checked=not problem))
            if not problem:
                previews_meta.render_images.add(resolved)
    meta.update(previews_meta)
    meta.warnings = warnings
    if not meta.name and name_from_stem:
        meta.name = stem
    return meta
