"""Hostile sidecars never crash, hang nor leak: a card nested too deeply is a broken card, a FIFO
or device under a sidecar's name is never read, a card or ``.civitai.info`` cannot make ingest
copy a file from elsewhere, a preview that is no image is never stored, and a render that cannot
be copied loses its image (with a warning), never the LoRA."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import pytest
from flux_fixtures import flux_lora, partial_names
from PIL import Image

import registry.ingest.rows as rows
from registry import Registry
from registry.lora import metadata
from registry.lora.formats import save_lora
from registry.lora.metadata import from_sidecars

DEEP = b"[" * 100_000 + b"]" * 100_000


def _lora(folder: Path, name: str = "fox") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    path.write_bytes(b"weights")
    return path


def _png(path: Path, colour: tuple[int, int, int] = (200, 80, 10)) -> Path:
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _save(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_lora(path, flux_lora(partial_names((seed % 19,), (), attention_only=True), rank=2, seed=seed), "diffusers")
    return path


def _in_thread(target, seconds: float = 20.0):
    """``target()``'s result; the test fails (instead of hanging) when it blocks."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(value=target()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked on a special file"
    return out["value"]


# ---- 1. nesting --------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".civitai.info"])
def test_a_card_nested_100000_deep_is_a_broken_card(tmp_path, suffix):
    lora = _lora(tmp_path)
    (tmp_path / f"fox{suffix}").write_bytes(DEEP)
    warnings: list[str] = []
    meta = from_sidecars(lora, warnings=warnings)
    assert meta.name == "fox" and meta.render_prompts == []
    assert warnings == [f"ignored sidecar {tmp_path / f'fox{suffix}'}: invalid JSON (nested too deeply)"]


def test_a_deep_card_beside_good_loras_loses_nothing(tmp_path):
    folder = tmp_path / "loras"
    _save(folder / "good.safetensors", 1), _save(folder / "bad.safetensors", 2)
    (folder / "bad.json").write_bytes(DEEP)
    report = Registry.open(tmp_path / "reg").add(folder)
    assert len(report.added) == 2 and not report.rejected
    assert any(w.startswith(f"ignored sidecar {folder / 'bad.json'}: invalid JSON") for w in report.warnings)


# ---- 2. special files --------------------------------------------------------------------------

def test_a_fifo_card_or_info_is_never_opened(tmp_path):
    lora = _lora(tmp_path)
    os.mkfifo(tmp_path / "fox.json"), os.mkfifo(tmp_path / "fox.civitai.info")
    warnings: list[str] = []
    meta = _in_thread(lambda: from_sidecars(lora, warnings=warnings))
    assert meta.name == "fox"
    assert sorted(warnings) == [f"ignored sidecar {tmp_path / 'fox.civitai.info'}: not a regular file",
                                f"ignored sidecar {tmp_path / 'fox.json'}: not a regular file"]


def test_a_card_linked_to_dev_zero_is_never_read(tmp_path):
    lora = _lora(tmp_path)
    (tmp_path / "fox.json").symlink_to("/dev/zero")
    (tmp_path / "fox.civitai.info").symlink_to("/dev/urandom")
    warnings: list[str] = []
    meta = _in_thread(lambda: from_sidecars(lora, warnings=warnings))
    assert meta.name == "fox"
    assert sorted(warnings) == [f"ignored sidecar {tmp_path / 'fox.civitai.info'}: not a regular file",
                                f"ignored sidecar {tmp_path / 'fox.json'}: not a regular file"]


def test_a_card_that_grows_after_its_size_check_is_read_to_the_cap_only(tmp_path, monkeypatch):
    lora = _lora(tmp_path)
    card = tmp_path / "fox.json"
    card.write_text(json.dumps({"name": "Fox", "description": "x" * 100}))
    real_fstat = os.fstat

    def small(fd):  # as if the file were 10 bytes when opened, and grew after
        info = real_fstat(fd)
        return os.stat_result((*info[:6], 10, *info[7:10]))

    monkeypatch.setattr(os, "fstat", small)
    monkeypatch.setattr(metadata, "_MAX_SIDECAR_BYTES", 20)
    reads: list[int] = []
    real_fdopen = os.fdopen

    class Counted(io.BufferedReader):
        def read(self, n=-1):
            reads.append(n)
            return super().read(n)

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Counted(real_fdopen(fd, "rb", buffering=0)))
    warnings: list[str] = []
    assert from_sidecars(lora, warnings=warnings).name == "fox"
    assert warnings == [f"ignored sidecar {card}: over 20 bytes"] and reads == [21]


def test_a_fifo_preview_is_never_opened_by_pil(tmp_path):
    lora = _lora(tmp_path)
    os.mkfifo(tmp_path / "fox.preview.png")
    warnings: list[str] = []
    meta = _in_thread(lambda: from_sidecars(lora, warnings=warnings))
    assert meta.name == "fox" and not meta.render_images
    assert warnings == [f"ignored render {tmp_path / 'fox.preview.png'}: not a regular file"]


def test_a_fifo_prompt_file_is_never_opened(tmp_path):
    lora = _lora(tmp_path)
    image = _png(tmp_path / "fox.png")
    os.mkfifo(tmp_path / "fox.txt")
    meta = _in_thread(lambda: from_sidecars(lora))
    assert meta.render_prompts == [""] and meta.render_images == {str(image)}


def test_fifo_sidecars_beside_good_loras_ingest_fine(tmp_path):
    folder = tmp_path / "loras"
    _save(folder / "good.safetensors", 1), _save(folder / "bad.safetensors", 2)
    os.mkfifo(folder / "bad.json"), os.mkfifo(folder / "bad.preview.png")
    report = _in_thread(lambda: Registry.open(tmp_path / "reg").add(folder), 120)
    assert len(report.added) == 2 and not report.rejected
    assert f"ignored sidecar {folder / 'bad.json'}: not a regular file" in report.warnings
    assert f"ignored render {folder / 'bad.preview.png'}: not a regular file" in report.warnings


# ---- 3. renders from elsewhere -----------------------------------------------------------------

def _card(folder: Path, *images: str, name: str = "fox") -> Path:
    card = folder / f"{name}.json"
    card.write_text(json.dumps({"name": "Fox", "renders": [{"image": i, "prompt": f"p {i}"} for i in images]}))
    return card


def _rejected(warnings: list[str]) -> dict[str, str]:
    return {w.split(" of ", 1)[0].removeprefix("ignored render "): w.rsplit(": ", 1)[1] for w in warnings}


def test_card_renders_outside_the_folder_or_not_images_are_never_copyable(tmp_path):
    outside = _png(tmp_path / "elsewhere.png")
    folder = tmp_path / "loras"
    lora = _lora(folder)
    (folder / "notes.png").write_bytes(b"not a png")
    (folder / "big.png").write_bytes(b"\0")
    os.truncate(folder / "big.png", metadata.MAX_RENDER_BYTES + 1)
    (folder / "linked.png").symlink_to(outside)
    (folder / "sub").mkdir()
    good = _png(folder / "sub" / "ok.png")
    Image.new("RGB", (8, 8)).save(folder / "ok.txt", format="PNG")  # an image, but not by its name
    card = _card(folder, "/etc/passwd", "/proc/self/environ", "../elsewhere.png", str(outside), "linked.png",
                 "notes.png", "big.png", "ok.txt", "sub", "sub/ok.png", "missing.png")
    warnings: list[str] = []
    meta = from_sidecars(lora, warnings=warnings)
    assert meta.render_images == {str(good)}  # the only one store_renders may copy
    assert len(meta.render_prompts) == 11  # each keeps its prompt, as a render without image
    assert all(w.startswith("ignored render '") and f" of {card}: " in w for w in warnings)
    outside_folder, no_image_name = "outside the LoRA's folder", "not an image file name (.png, .jpg, .jpeg, .webp)"
    assert _rejected(warnings) == {  # a missing render gives no warning: as before
        "'/etc/passwd'": outside_folder, "'/proc/self/environ'": outside_folder, "'../elsewhere.png'": outside_folder,
        repr(str(outside)): outside_folder, "'linked.png'": outside_folder,
        "'notes.png'": "not a readable PNG, JPEG, WebP or GIF image (UnidentifiedImageError)",
        "'big.png'": f"over {metadata.MAX_RENDER_BYTES:,} bytes", "'ok.txt'": no_image_name, "'sub'": no_image_name}


def test_a_card_render_inside_the_folder_of_the_file_its_lora_links_to_is_kept(tmp_path):
    blobs = tmp_path / "cache"  # e.g. a Hugging Face cache: the snapshot's files link to its blobs
    _lora(blobs, "abc123")
    _png(blobs / "img456.png")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "fox.safetensors").symlink_to(blobs / "abc123.safetensors")
    (snapshot / "render.png").symlink_to(blobs / "img456.png")
    _card(snapshot, "render.png")
    warnings: list[str] = []
    meta = from_sidecars(snapshot / "fox.safetensors", warnings=warnings)
    assert meta.render_images == {str(blobs / "img456.png")} and warnings == []


def test_a_civitai_url_is_never_a_local_path(tmp_path):
    lora = _lora(tmp_path)
    _png(tmp_path / "local.png")
    info = tmp_path / "fox.civitai.info"
    urls = ["/etc/passwd", "../../etc/passwd", str(tmp_path / "local.png"), "https://example.invalid/1.png"]
    info.write_text(json.dumps({"images": [{"url": u, "meta": {"prompt": f"p{i}"}} for i, u in enumerate(urls)]}))
    warnings: list[str] = []
    meta = from_sidecars(lora, warnings=warnings)
    assert meta.render_prompts == ["p0", "p1", "p2", "p3"] and not meta.render_images
    assert warnings == [f"ignored render {u!r} of {info}: not an http(s) URL" for u in urls[:3]]


def test_a_corrupt_preview_keeps_its_prompt_but_no_image(tmp_path):
    lora = _lora(tmp_path)
    (tmp_path / "fox.png").write_bytes(b"not a png")
    (tmp_path / "fox.txt").write_text("a fox in the snow")
    good = _png(tmp_path / "fox.preview.png")
    warnings: list[str] = []
    meta = from_sidecars(lora, warnings=warnings)
    assert meta.render_prompts == ["a fox in the snow", ""] and meta.render_images == {str(good)}
    assert warnings == [f"ignored render {tmp_path / 'fox.png'}: "
                        "not a readable PNG, JPEG, WebP or GIF image (UnidentifiedImageError)"]


def test_ingest_stores_no_hostile_render(tmp_path):
    folder = tmp_path / "loras"
    _save(folder / "bad.safetensors", 3)
    _card(folder, "/etc/passwd", "../../secret.png", "bad.ok.png", name="bad")
    _png(folder / "bad.ok.png")
    (folder / "bad.png").write_bytes(b"not a png")
    reg = Registry.open(tmp_path / "reg")
    report = reg.add(folder)
    assert len(report.added) == 1
    row = reg.get(report.added[0]["lora_id"])
    stored = [b for b in row["render_blobs"] if b]
    assert len(stored) == 1 and (reg.root / stored[0]).read_bytes() == (folder / "bad.ok.png").read_bytes()
    assert sum(w.startswith("ignored render") for w in report.warnings) == 3
    assert not [p for p in (reg.root / "blobs").rglob("*.png") if str(p.relative_to(reg.root)) not in stored]


# ---- 4. a render that cannot be copied ---------------------------------------------------------

def test_an_uncopyable_render_loses_its_image_not_the_lora(tmp_path, monkeypatch):
    folder = tmp_path / "loras"
    _save(folder / "good.safetensors", 1), _save(folder / "bad.safetensors", 2)
    _png(folder / "bad.preview.png", (1, 2, 3)), _png(folder / "good.preview.png", (4, 5, 6))
    real = rows.sha256_file

    def denied(path):
        if str(path).endswith("bad.preview.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(rows, "sha256_file", denied)
    reg = Registry.open(tmp_path / "reg")
    report = reg.add(folder)
    assert len(report.added) == 2 and not report.rejected
    assert report.warnings == [f"ignored render {folder / 'bad.preview.png'}: unreadable: Permission denied"]
    by_name = {r["name"]: r for r in reg.column_rows(reg.loras, ["name", "render_blobs"])}
    assert by_name["bad"]["render_blobs"] == [""] and by_name["good"]["render_blobs"][0]
    assert [p.name for p in (reg.root / "blobs").rglob("*.png")] == [Path(by_name["good"]["render_blobs"][0]).name]


def test_a_render_that_became_a_fifo_or_folder_is_not_copied(tmp_path):
    image = _png(tmp_path / "a.png")
    meta = metadata.LoraMetadata(render_paths=[str(image), str(tmp_path / "d.png")], render_prompts=["a", "d"],
                                 render_images={str(image), str(tmp_path / "d.png")})
    (tmp_path / "d.png").mkdir()
    image.unlink(), os.mkfifo(image)
    reg = Registry.open(tmp_path / "reg")
    warnings: list[str] = []
    blobs = _in_thread(lambda: rows.store_renders(reg, meta, warnings))
    assert blobs == ["", ""] and meta.render_prompts == ["a", "d"]
    reason = f"no longer a regular file of at most {metadata.MAX_RENDER_BYTES:,} bytes"
    assert warnings == [f"ignored render {image}: {reason}", f"ignored render {tmp_path / 'd.png'}: {reason}"]


def _png_with_garbage_pixels(path: Path) -> Path:
    """A PNG whose chunks all have valid checksums (so PIL's verify() passes) but whose IDAT does
    not inflate to an image."""
    import struct
    import zlib

    data = bytearray(_png(path).read_bytes())
    at = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[at:at + 4])[0]
    garbage = bytes((i * 37 + 11) % 251 for i in range(length))
    data[at + 8:at + 8 + length] = garbage
    data[at + 8 + length:at + 12 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + garbage))
    path.write_bytes(bytes(data))
    return path


def test_a_preview_that_verifies_but_does_not_decode_is_not_a_render(tmp_path):
    from PIL import Image as PilImage

    lora = _lora(tmp_path)
    broken = _png_with_garbage_pixels(tmp_path / "fox.preview.png")
    with PilImage.open(broken) as image:
        image.verify()  # what the check was before: it passes
    warnings: list[str] = []
    meta = from_sidecars(lora, warnings=warnings)
    assert not meta.render_images and len(warnings) == 1
    assert warnings[0].startswith(f"ignored render {broken}: not a readable PNG, JPEG, WebP or GIF image")


def test_a_preview_with_too_many_pixels_is_not_decoded(tmp_path, monkeypatch):
    monkeypatch.setattr(metadata, "MAX_RENDER_PIXELS", 63)
    lora = _lora(tmp_path)
    big = _png(tmp_path / "fox.preview.png")  # 8 x 8
    warnings: list[str] = []
    assert not from_sidecars(lora, warnings=warnings).render_images
    assert warnings == [f"ignored render {big}: 8x8 pixels, over the 63 a render may have"]
