"""registry.lora.metadata: a broken sidecar (not JSON, not an object, not UTF-8, too big, or shaped
unlike a card or a Civitai info) gives no metadata and one warning naming the file and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry.lora import metadata
from registry.lora.metadata import from_sidecars


def _lora(folder: Path) -> Path:
    path = folder / "fox.safetensors"
    path.write_bytes(b"weights")
    return path


@pytest.mark.parametrize("content, reason", [
    (b"{not json", "invalid JSON (Expecting property name"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"name": "\xff\xfe"}', "not UTF-8 text"),
    (json.dumps({"name": "Fox", "renders": 5}).encode(), "unexpected content (TypeError"),
])
def test_a_broken_card_is_warned_about_and_ignored(tmp_path, content, reason):
    lora = _lora(tmp_path)
    (tmp_path / "fox.json").write_bytes(content)
    warnings: list[str] = []
    meta = from_sidecars(lora, warnings=warnings)
    assert meta.name == "fox" and meta.trigger_words == [] and meta.render_prompts == []  # nothing of it kept
    assert len(warnings) == 1 and warnings[0].startswith(f"ignored sidecar {tmp_path / 'fox.json'}: {reason}")
    from_sidecars(lora, warnings=warnings)  # the same file again: no second line
    assert len(warnings) == 1
    assert from_sidecars(lora).name == "fox"  # without a list: ignored quietly, as before


def test_a_garbage_civitai_info_leaves_the_card_and_the_row_clean(tmp_path, monkeypatch):
    lora = _lora(tmp_path)
    (tmp_path / "fox.json").write_text(json.dumps({"name": "Fox", "trigger_words": ["f0x"]}))
    (tmp_path / "fox.civitai.info").write_text(json.dumps({"trainedWords": ["junk"], "images": [{"meta": "x"}]}))
    warnings: list[str] = []
    meta = from_sidecars(lora, warnings=warnings)
    assert meta.name == "Fox" and meta.trigger_words == ["f0x"]
    assert warnings == [f"ignored sidecar {tmp_path / 'fox.civitai.info'}: unexpected content "
                        "(AttributeError: 'str' object has no attribute 'get')"]
    monkeypatch.setattr(metadata, "_MAX_SIDECAR_BYTES", 4)
    warnings.clear()
    assert from_sidecars(lora, warnings=warnings).name == "fox"
    assert [w.split(": ", 1)[1] for w in warnings] == ["over 4 bytes"] * 2


def test_an_unreadable_preview_prompt_loses_the_prompt_not_the_lora(tmp_path, monkeypatch):
    lora = _lora(tmp_path)
    (tmp_path / "fox.png").write_bytes(b"not a png")
    (tmp_path / "fox.txt").write_text("a fox in the snow")
    assert from_sidecars(lora).render_prompts == ["a fox in the snow"]
    read_text = Path.read_text

    def denied(self, *args, **kwargs):
        if self.suffix == ".txt":
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    meta = from_sidecars(lora)
    assert meta.name == "fox" and meta.render_prompts == [""]


@pytest.mark.parametrize("frequencies", [
    '{"data": {"fox": NaN, "red": 3}}', '{"data": {"fox": Infinity, "red": 3}}', '{"data": {"fox": 1e400, "red": 3}}',
    "[" * 100_000 + "]" * 100_000, "{not json",
])
def test_a_headers_tag_counts_that_are_no_finite_numbers_are_skipped(frequencies):
    """kohya's ``ss_tag_frequency`` is JSON, which Python reads with NaN and Infinity: such a count
    (or JSON nested too deep to read) made the header's metadata raise, so the LoRA was recorded as
    an internal error instead of being ingested."""
    meta = metadata.from_header({"ss_output_name": "fox", "ss_tag_frequency": frequencies})
    assert meta.name == "fox" and meta.tags in ([], ["red"])
