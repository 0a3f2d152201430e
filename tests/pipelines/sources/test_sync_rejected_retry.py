"""Rejected files come back once their rejection can change (``unknown_base``: the base gets
registered), for a downloading source without fetching anything again."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "registry"))
from flux_fixtures import flux_lora, tiny_flux_base  # noqa: E402

from pipelines.sources.base import Candidate, RemoteFile  # noqa: E402
from pipelines.sources.local import LocalSource  # noqa: E402
from pipelines.sources.sync import sync  # noqa: E402
from registry import Registry  # noqa: E402
from registry.lora.formats import save_lora  # noqa: E402


class OneRelease:
    """A downloading source listing one release once (then nothing new), counting its downloads."""

    name = "remote"

    def __init__(self, data: bytes) -> None:
        self.data, self.fetched = data, 0

    def discover(self, cursor):
        if (cursor or {}).get("listed"):
            return [], cursor
        release = Candidate(source=self.name, id="owner/tiny", revision="v1", name="tiny",
                            files=[RemoteFile("tiny.safetensors", "https://example.invalid/tiny", len(self.data))])
        return [release], {"listed": True}

    def fetch(self, candidate, file, dest_dir: Path) -> Path:
        self.fetched += 1
        path = Path(dest_dir) / file.name
        path.write_bytes(self.data)
        return path


def _tiny_lora(path: Path) -> Path:
    base = tiny_flux_base()
    save_lora(path, flux_lora(list(base.layer_shapes)[:4], rank=2, base=base), "diffusers")
    return path


def test_a_downloaded_release_rejected_for_its_base_is_ingested_after_register_base_without_a_new_download(tmp_path):
    source = OneRelease(_tiny_lora(tmp_path / "made.safetensors").read_bytes())
    reg = Registry.open(tmp_path / "reg")
    first = sync(source, reg, tmp_path / "downloads")
    assert [r["code"] for r in first.ingest.rejected] == ["unknown_base"] and source.fetched == 1
    reg.register_base(tiny_flux_base())
    second = sync(source, reg, tmp_path / "downloads", first.cursor)
    assert second.discovered == 0 and second.downloaded == [] and source.fetched == 1
    assert len(second.ingest.added) == 1 and second.ingest.rejected == []


def test_a_local_file_rejected_for_its_base_stays_out_of_the_cursor_until_ingested(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    tiny = _tiny_lora(folder / "tiny.safetensors")
    (folder / "junk.safetensors").write_bytes(b"not a safetensors file")
    reg = Registry.open(tmp_path / "reg")
    first = sync(LocalSource(folder), reg, tmp_path / "unused")
    codes = {Path(r["path"]).name: r["code"] for r in first.ingest.rejected}
    assert codes["tiny.safetensors"] == "unknown_base" and codes["junk.safetensors"] != "unknown_base"
    assert list(first.cursor["source"]["files"]) == [str(folder / "junk.safetensors")]  # junk stays seen
    again = sync(LocalSource(folder), reg, tmp_path / "unused", first.cursor)
    assert again.discovered == 1 and [r["path"] for r in again.ingest.rejected] == [str(tiny)]
    reg.register_base(tiny_flux_base())
    third = sync(LocalSource(folder), reg, tmp_path / "unused", again.cursor)
    assert [a["path"] for a in third.ingest.added] == [str(tiny)]
    assert sorted(third.cursor["source"]["files"]) == sorted(str(folder / n) for n in ("junk.safetensors",
                                                                                        "tiny.safetensors"))
    assert sync(LocalSource(folder), reg, tmp_path / "unused", third.cursor).discovered == 0
