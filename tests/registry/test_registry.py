"""The LanceDB registry end to end: ingest folders, dedupe, sidecar metadata, search, versions,
and bad input rejected with a reason while the registry stays unchanged."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from bad_files import entry, write_malicious_pickle, write_malicious_torch_save, write_raw_safetensors
from flux_fixtures import flux_lora, partial_names

from registry.lora.formats import save_lora
from registry import Registry


def _lora(seed: int, double=(0,), single=(1,)):
    return flux_lora(partial_names(double, single, attention_only=True), rank=4, seed=seed)


def make_folder(folder: Path) -> dict[str, Path]:
    """Three distinct LoRAs with sidecars, one re-saved in another format, one byte-copy."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "ember": folder / "ember_glow.safetensors",
        "ember_kohya": folder / "sub" / "ember_glow_kohya.safetensors",
        "ocean": folder / "ocean.safetensors",
        "ocean_copy": folder / "zcopies" / "ocean (1).safetensors",
        "sketch": folder / "pencil_sketch.safetensors",
    }
    for p in files.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    ember, ocean, sketch = _lora(1), _lora(2, (3,), (5,)), _lora(3, (7,), ())
    save_lora(files["ember"], ember, "diffusers")
    save_lora(files["ember_kohya"], ember, "kohya")
    save_lora(files["ocean"], ocean, "comfyui", metadata={
        "ss_output_name": "ocean waves",
        "ss_tag_frequency": json.dumps({"10_ocean": {"ocean waves": 12, "seascape": 7, "blue water": 3}}),
        "ss_base_model_version": "flux1",
    })
    files["ocean_copy"].write_bytes(files["ocean"].read_bytes())
    save_lora(files["sketch"], sketch, "kohya")
    (folder / "ember_glow.json").write_text(json.dumps({
        "name": "Ember Glow", "trigger_words": ["emb3r"], "description": "glowing embers, warm fire light",
        "licence": "cc-by-4.0", "nsfw_level": "None", "source_url": "https://civitai.example/models/1",
        "renders": [{"image": "ember_glow.preview.png", "prompt": "emb3r, a campfire at night"}],
    }))
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a pencil sketch of a cat\nNegative prompt: blurry")
    Image.new("RGB", (8, 8), (200, 80, 10)).save(folder / "ember_glow.preview.png")
    Image.new("RGB", (8, 8), (90, 90, 90)).save(folder / "pencil_sketch.png", pnginfo=info)
    (folder / "pencil_sketch.civitai.info").write_text(json.dumps({
        "name": "v1", "trainedWords": ["skchy"], "baseModel": "Flux.1 D",
        "model": {"name": "Pencil Sketch", "tags": ["drawing", "graphite"], "nsfwLevel": "Mature"},
    }))
    return files


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest")
    files = make_folder(root / "loras")
    reg = Registry.open(root / "registry")
    report = reg.add([root / "loras"])
    return reg, files, report


def test_folder_ingest_dedupes_by_sha256_and_fingerprint(ingested):
    reg, files, report = ingested
    assert len(report.added) == 3 and len(reg) == 3 and not report.rejected
    kinds = {Path(d["path"]).name: d["kind"] for d in report.duplicates}
    assert kinds == {"ocean (1).safetensors": "sha256", "ember_glow_kohya.safetensors": "fingerprint"}
    by_path = {Path(a["path"]).name: a["lora_id"] for a in report.added}
    dup_ids = {Path(d["path"]).name: d["lora_id"] for d in report.duplicates}
    assert dup_ids["ember_glow_kohya.safetensors"] == by_path["ember_glow.safetensors"]
    assert dup_ids["ocean (1).safetensors"] == by_path["ocean.safetensors"]


def test_rows_carry_file_and_sidecar_metadata(ingested):
    reg, files, report = ingested
    rows = {reg.get(a["lora_id"])["name"]: reg.get(a["lora_id"]) for a in report.added}
    assert set(rows) == {"Ember Glow", "ocean waves", "Pencil Sketch"}
    ember, ocean, sketch = rows["Ember Glow"], rows["ocean waves"], rows["Pencil Sketch"]
    assert ember["trigger_words"] == ["emb3r"] and ember["render_prompts"] == ["emb3r, a campfire at night"]
    assert (reg.root / ember["render_blobs"][0]).is_file()
    assert ocean["tags"][:2] == ["ocean waves", "seascape"] and ocean["format"] == "comfyui"
    assert ocean["header_metadata"]["ss_base_model_version"] == "flux1"
    assert sketch["trigger_words"] == ["skchy"] and "graphite" in sketch["tags"]
    assert sketch["render_prompts"] == ["a pencil sketch of a cat"]
    for row in rows.values():
        assert row["architecture"] == "flux" and row["base_model"] == "FLUX.1-dev" and row["rank"] == 4
        assert (reg.root / row["blob"]).is_file()


def test_search_filters_on_licence_and_nsfw_level(ingested):
    reg, _, _ = ingested
    hits = reg.search("fire", k=5, channel="text", where="licence = 'cc-by-4.0' AND nsfw_level = 'None'")
    assert [h.name for h in hits] == ["Ember Glow"]
    assert reg.get(hits[0].lora_id)["source_url"] == "https://civitai.example/models/1"
    safe = {h.name for h in reg.search("drawing", k=5, channel="text", where="nsfw_level IS NULL OR nsfw_level != 'Mature'")}
    assert "Pencil Sketch" not in safe and "Ember Glow" in safe


def test_search_hybrid_text_and_vector(ingested):
    reg, _, _ = ingested
    for channel in ("hybrid", "text"):
        assert reg.search("ocean waves by the sea", k=1, channel=channel)[0].name == "ocean waves", channel
    assert reg.search("a drawing made with graphite", k=1)[0].name == "Pencil Sketch"
    assert reg.search("campfire embers", k=1, channel="text")[0].name == "Ember Glow"
    assert reg.search("ocean", k=3, base_model="FLUX.1-schnell") == []  # a known base, none of its LoRAs here
    with pytest.raises(ValueError, match="unknown base model 'SDXL'; known: FLUX.1-dev, FLUX.1-schnell$"):
        reg.search("ocean", k=3, base_model="SDXL")
    assert reg.search("fire 'quoted\" (weird) ~ text*", k=2)  # query syntax never crashes


def test_reingest_is_a_no_op_and_versions_tag(ingested, tmp_path, monkeypatch):
    import registry.ingest as ingest

    reg, files, _ = ingested
    reg.tag("v1")
    before = reg.version
    monkeypatch.setattr(ingest, "sha256_file", lambda path: pytest.fail(f"{path} was hashed"))
    again = reg.add([files["ember"].parent])  # unchanged files cost a stat, not a hash
    assert not again.added and not again.duplicates and len(again.unchanged) == 5 and len(reg) == 3
    assert reg.version == before
    pinned = Registry.open(reg.root, version="v1")
    assert len(pinned) == 3 and pinned.tags()["v1"] == before
    with pytest.raises(PermissionError):
        pinned.add([files["ember"]])


def test_rows_made_while_the_blob_copy_runs_match_the_batched_ones(ingested, tmp_path, monkeypatch):
    """While the hash + blob copy of a file still runs, its metadata and text vector are made
    then instead of in the batch flush: the rows must come out the same."""
    import threading

    import numpy as np

    from registry.store.blobstore import BlobStore

    reg, files, report = ingested
    release = threading.Event()
    stage = BlobStore.stage

    def slow_stage(self, source):
        release.wait(timeout=30)
        return stage(self, source)

    def inspect_then_release(*args, **kwargs):
        try:
            return inspect_file(*args, **kwargs)
        finally:
            threading.Timer(0.2, release.set).start()

    import registry.ingest as ingest

    inspect_file, made_early = ingest.inspect_file, []
    monkeypatch.setattr(BlobStore, "stage", slow_stage)
    monkeypatch.setattr(ingest, "inspect_file", inspect_then_release)
    monkeypatch.setattr(ingest, "_early", lambda *a, f=ingest._early: made_early.append(1) or f(*a))
    early = Registry.open(tmp_path / "early")
    assert len(early.add([files["ember"]]).added) == 1 and made_early == [1]
    added = {Path(a["path"]).name: a["lora_id"] for a in report.added}
    want, got = reg.get(added["ember_glow.safetensors"]), early.get(added["ember_glow.safetensors"])
    for key in ("name", "trigger_words", "render_prompts", "search_text", "sha256", "fingerprint"):
        assert got[key] == want[key], key
    vectors = [t.loras.search().where(f"lora_id = '{want['lora_id']}'").limit(1).to_list()[0]
               ["text_vector"] for t in (reg, early)]
    assert np.allclose(vectors[0], vectors[1], atol=1e-5)
    assert early.search("campfire embers", k=1, channel="text")[0].name == "Ember Glow"



def test_the_text_vector_is_made_before_the_lookup_that_could_outlast_the_copy(ingested, tmp_path, monkeypatch):
    """The copy still runs when inspection ends, but the look-up of the new LoRA's id lasts
    until the copy is done: its text vector must still be made beside the copy, not alone at
    flush (where it adds its whole time to the add: 6 of an XLabs add's ~60 ms)."""
    import threading
    import time

    import registry.ingest as ingest
    from registry.store.blobstore import BlobStore

    _, files, _ = ingested
    inspected, copied = threading.Event(), threading.Event()
    stage, stored_lora, made_early = BlobStore.stage, ingest.Batch.stored_lora, []

    def stage_after_inspection(self, source):
        inspected.wait(timeout=30)
        try:
            return stage(self, source)
        finally:
            copied.set()

    def lookup_after_the_copy(self, lora_id):
        inspected.set()
        copied.wait(timeout=30)
        time.sleep(0.2)  # the copy's future is done a moment after its function returns
        return stored_lora(self, lora_id)

    monkeypatch.setattr(BlobStore, "stage", stage_after_inspection)
    monkeypatch.setattr(ingest.Batch, "stored_lora", lookup_after_the_copy)
    monkeypatch.setattr(ingest, "_early", lambda *a, f=ingest._early: made_early.append(1) or f(*a))
    reg = Registry.open(tmp_path / "text-first")
    assert len(reg.add([files["ember"]]).added) == 1
    assert made_early == [1]
    assert reg.search("campfire embers", k=1, channel="text")[0].name == "Ember Glow"

def test_the_text_vector_is_made_by_the_hash_thread_when_the_copy_ends_first(ingested, tmp_path, monkeypatch):
    """The copy ends while the file is still inspected (a small LoRA, or one whose conversion is
    long): its text vector, queued when the header was read, is made by the hash thread then,
    beside the rest of inspection, not on this thread after it or alone at flush."""
    import threading

    import registry.ingest as ingest
    from registry.store.blobstore import BlobStore

    _, files, _ = ingested
    copied, made_by = threading.Event(), []
    stage, inspect_file = BlobStore.stage, ingest.inspect_file

    def stage_then_say(self, source):
        try:
            return stage(self, source)
        finally:
            copied.set()

    def inspect_past_the_copy(*args, **kwargs):
        info = inspect_file(*args, **kwargs)
        assert copied.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not made_by and time.monotonic() < deadline:  # the queued text runs once the copy is done
            time.sleep(0.01)
        return info

    monkeypatch.setattr(BlobStore, "stage", stage_then_say)
    monkeypatch.setattr(ingest, "inspect_file", inspect_past_the_copy)
    monkeypatch.setattr(ingest, "_early", lambda *a, f=ingest._early: made_by.append(
        threading.current_thread().name) or f(*a))
    flushed = []
    monkeypatch.setattr(ingest.Batch, "flush", lambda self, f=ingest.Batch.flush: flushed.append(
        [r["text_vector"] is not None for r in self.loras.values()]) or f(self))
    reg = Registry.open(tmp_path / "text-in-the-hash-thread")
    assert len(reg.add([files["ember"]]).added) == 1
    assert len(made_by) == 1 and made_by[0].startswith("autolora-hash"), made_by
    assert flushed == [[True]]  # the row reached the flush with its vector
    assert reg.search("campfire embers", k=1, channel="text")[0].name == "Ember Glow"


def _bad_files(folder: Path, sentinel: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = _lora(9)
    files = {}
    for ext in (".ckpt", ".pt", ".bin", ".safetensors"):
        files[f"pickle{ext}"] = write_malicious_pickle(folder / f"bomb{ext}", sentinel)
    files["torch_save.pt"] = write_malicious_torch_save(folder / "bomb_zip.pt", sentinel)
    files["torch_save.safetensors"] = write_malicious_torch_save(folder / "bomb_zip.safetensors", sentinel)
    save_lora(folder / "whole.safetensors", good, "diffusers")
    data = (folder / "whole.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    files["truncated"] = folder / "truncated.safetensors"
    files["header_past_eof"] = write_raw_safetensors(folder / "past_eof.safetensors", {}, length=10_000)
    files["header_too_large"] = write_raw_safetensors(folder / "huge.safetensors", {}, length=2**40)
    files["invalid_json"] = write_raw_safetensors(folder / "json.safetensors", None, raw_header=b"{not json")
    files["overlap"] = write_raw_safetensors(
        folder / "overlap.safetensors",
        {"a.lora_A.weight": entry("F32", [2, 2], 0), "a.lora_B.weight": entry("F32", [2, 2], 8)}, b"\0" * 24)
    files["out_of_range"] = write_raw_safetensors(
        folder / "range.safetensors", {"a.lora_A.weight": entry("F32", [2, 2], 64)}, b"\0" * 16)
    (folder / "whole.safetensors").unlink()
    a, b = next(iter(good.values()))
    for name, value in (("nan", math.nan), ("inf", math.inf)):
        bad = dict(good)
        key = next(iter(good))
        poisoned = a.clone()
        poisoned[0, 0] = value
        bad[key] = (poisoned, b)
        files[name] = folder / f"{name}.safetensors"
        save_lora(files[name], bad, "diffusers")
    from safetensors.torch import save_file

    files["rank_mismatch"] = folder / "rank.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 3072),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(3072, 8)},
              str(files["rank_mismatch"]))
    files["full_checkpoint"] = folder / "model.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.randn(64, 64),
               "transformer_blocks.0.attn.to_q.bias": torch.randn(64)}, str(files["full_checkpoint"]))
    files["empty"] = folder / "empty.safetensors"
    files["empty"].write_bytes(b"")
    files["unknown_architecture"] = folder / "alien.safetensors"
    save_file({"lora_unet_mystery_block_0_proj.lora_down.weight": torch.randn(4, 40),
               "lora_unet_mystery_block_0_proj.lora_up.weight": torch.randn(40, 4)},
              str(files["unknown_architecture"]))
    return files


def test_bad_input_rejected_with_reasons_registry_unchanged(tmp_path):
    sentinel = tmp_path / "PWNED"
    reg = Registry.open(tmp_path / "registry")
    reg.add([make_folder(tmp_path / "good")["ember"]])
    version, blobs = reg.version, sorted((reg.root / "blobs").rglob("*"))
    bad = _bad_files(tmp_path / "bad", sentinel)
    report = reg.add([tmp_path / "bad"])
    assert not sentinel.exists()
    assert not report.added and not report.duplicates
    rejected = {Path(r["path"]).name: r for r in report.rejected}
    assert set(rejected) == {p.name for p in bad.values()}
    reasons = {r["reason"] for r in report.rejected}
    assert len(reasons) >= 12, reasons  # each kind of problem has its own reason
    codes = {name: rejected[path.name]["code"] for name, path in bad.items()}
    assert codes["pickle.ckpt"] == codes["pickle.pt"] == codes["pickle.bin"] == "unsupported_extension"
    assert codes["pickle.safetensors"] == codes["torch_save.safetensors"] == "pickle"
    assert codes["truncated"] == "truncated" and codes["empty"] == "empty"
    assert codes["header_past_eof"] == "header_past_eof" and codes["header_too_large"] == "header_too_large"
    assert codes["invalid_json"] == "invalid_json"
    assert codes["overlap"] == codes["out_of_range"] == "bad_offsets"
    assert codes["nan"] == codes["inf"] == "nan_inf"
    assert codes["rank_mismatch"] == "rank_mismatch" and codes["full_checkpoint"] == "full_checkpoint"
    assert codes["unknown_architecture"] == "unknown_architecture"
    assert reg.version == version and len(reg) == 1
    assert sorted((reg.root / "blobs").rglob("*")) == blobs
    recorded = reg.rejections.to_arrow().to_pylist()
    assert {Path(r["path"]).name for r in recorded} == set(rejected)
    assert all(r["reason"] for r in recorded)
    assert not sentinel.exists()


def _synthetic_rows(reg: Registry, vectors, base_models) -> None:
    """Rows with only ids, names, base models and text vectors (like benchmarks/search.py)."""
    import pyarrow as pa

    from registry.store.schema import TEXT_DIM

    n, schema = len(vectors), reg.loras.schema
    columns = {
        "lora_id": pa.array([f"lora-{i:08d}" for i in range(n)]),
        "name": pa.array([f"synthetic {i}" for i in range(n)]),
        "base_model": pa.array(base_models),
        "search_text": pa.array([f"synthetic lora {i}" for i in range(n)]),
        "text_vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), TEXT_DIM),
    }
    reg.loras.add(pa.Table.from_arrays(
        [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in schema], schema=schema))


def test_vector_index_search(tmp_path, monkeypatch):
    """Past VECTOR_INDEX_MIN_ROWS the registry builds its IVF-HNSW index (here on a small table,
    two partitions) and vector search goes through it: near-exact top-k, any k, prefiltered by
    base model, and a pinned version searches that version."""
    import numpy as np

    from registry.store import search

    monkeypatch.setattr(search, "VECTOR_INDEX_MIN_ROWS", 500)
    monkeypatch.setattr(search, "VECTOR_PARTITION_ROWS", 300)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    reg = Registry.open(tmp_path / "registry")
    _synthetic_rows(reg, vectors, ["FLUX.1-dev", "tiny-flux"] * 300)
    flat_version = reg.version
    reg.tag("flat")
    reg.maintain()
    index = next(i for i in reg.loras.list_indices() if i.name == "text_vector_idx")
    assert index.index_type == "IvfHnswSq"
    found = 0
    for i in range(20):
        query = vectors[i] + 0.05 * rng.standard_normal(384).astype(np.float32)
        exact = {f"lora-{j:08d}" for j in np.argsort(-(vectors @ query))[:10]}
        found += len({h.lora_id for h in reg.search_by_vector(query, k=10)} & exact)
    assert found >= 190  # recall@10 >= 0.95
    many = reg.search_by_vector(vectors[3], k=100)  # k * ANN_REFINE > ANN_EF
    assert len(many) == 100 and many[0].lora_id == "lora-00000003" and many[0].score > 0.999
    hits = reg.search_by_vector(vectors[3], k=5, base_model="tiny-flux")
    assert hits and all(h.base_model == "tiny-flux" for h in hits)
    assert len(reg.search("synthetic lora", k=3)) == 3  # hybrid search with the index
    later = Registry.open(tmp_path / "later")
    _synthetic_rows(later, -vectors[:1], ["FLUX.1-dev"])  # a row the tagged version lacks
    reg.loras.add(later.loras.to_arrow().set_column(0, "lora_id", [["lora-later"]]))
    assert reg.search_by_vector(-vectors[0], k=1)[0].lora_id == "lora-later"
    for pinned in (Registry.open(reg.root, version=flat_version), Registry.open(reg.root, version="flat")):
        assert pinned.search_by_vector(-vectors[0], k=1)[0].lora_id != "lora-later"
        assert pinned.search_by_vector(vectors[3], k=1)[0].lora_id == "lora-00000003"
