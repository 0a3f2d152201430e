"""Search: hybrid scores (z-score fusion, 1.0 = first in every list, independent of k), the vector
index searched from memory without re-ranking, removed rows hidden, and query vectors equal to the
ones stored at ingest."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

from registry import Registry
from registry.store import search
from registry.store.schema import TEXT_DIM


class FixedEncoder:
    """Embeds every prompt as one given vector (search's ``encoder=`` hook)."""

    dim, name = TEXT_DIM, "fixed"

    def __init__(self, vector: np.ndarray) -> None:
        self.vector = vector

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return np.repeat(self.vector[None], len(texts), axis=0)


def add_rows(reg: Registry, vectors: np.ndarray, texts: list[str], base_models: list[str] | None = None,
             weights: np.ndarray | None = None, encoder_version: str = "enc-test") -> None:
    """Rows with only ids, names, texts, base models and vectors (like benchmarks/search.py);
    with ``weights``, weight vectors of ``encoder_version`` too, made active (rows of a base other
    than the first one's: of ``encoder_version-BASE``, as each base has its own encoder)."""
    n, schema = len(vectors), reg.loras.schema
    base_models = base_models or ["FLUX.1-dev"] * n
    columns = {
        "lora_id": pa.array([f"lora-{i:08d}" for i in range(n)]),
        "name": pa.array([f"synthetic {i}" for i in range(n)]),
        "base_model": pa.array(base_models),
        "search_text": pa.array(texts),
        "text_vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), TEXT_DIM),
        "added_at": pa.array([datetime.now(timezone.utc)] * n, type=schema.field("added_at").type),
    }
    missing = np.isnan(vectors).all(axis=1)  # rows with no text vector (their text names nothing)
    if missing.any():
        columns["text_vector"] = pa.FixedSizeListArray.from_arrays(
            pa.array(np.nan_to_num(vectors).reshape(-1)), TEXT_DIM, mask=pa.array(missing))
    if weights is not None:
        columns["weight_vector"] = pa.FixedSizeListArray.from_arrays(pa.array(weights.reshape(-1)), TEXT_DIM)
        versions = [encoder_version if b == base_models[0] else f"{encoder_version}-{b}" for b in base_models]
        columns["encoder_version"] = pa.array(versions)
        reg.upsert(reg.encoders, [{"version": v, "base_model": b, "file": "none", "info": "{}", "active": True}
                                  for v, b in dict(zip(versions, base_models)).items()], "version", update=True)
    reg.loras.add(pa.Table.from_arrays(
        [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in schema], schema=schema))


def unit(rows: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, TEXT_DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """200 rows; row i's text holds the words ``wi`` and ``group{i % 10}``."""
    reg = Registry.open(tmp_path_factory.mktemp("search") / "registry")
    vectors = unit(200, 0)
    add_rows(reg, vectors, [f"w{i} group{i % 10} synthetic" for i in range(200)])
    reg.maintain()
    return reg, vectors


def test_hybrid_score_is_one_when_first_in_both_channels(small):
    reg, vectors = small
    hits = reg.search("w7", k=5, encoder=FixedEncoder(vectors[7]))
    assert hits[0].lora_id == "lora-00000007" and hits[0].score == pytest.approx(1.0, abs=1e-6)
    assert all(0 < h.score < 1 for h in hits[1:])  # none first in both channels
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_hybrid_scores_do_not_depend_on_k(small):
    reg, vectors = small
    encoder = FixedEncoder(vectors[3] + vectors[13])  # ranks differ between the two channels
    deep = {h.lora_id: h.score for h in reg.search("group3", k=30, encoder=encoder)}
    for k in (1, 3, 10):
        hits = reg.search("group3", k=k, encoder=encoder)
        assert len(hits) == k
        assert all(h.score == pytest.approx(deep[h.lora_id], abs=1e-6) for h in hits)


@pytest.mark.parametrize("postfiltered", [1_000, 0])
def test_filters_and_removed_rows(tmp_path, monkeypatch, postfiltered):
    """Filters apply to both hybrid channels; removed rows are hidden in every mode, whether by
    over-fetching and a postfilter (few removed) or by a prefilter, and shown on request."""
    monkeypatch.setattr(search, "MAX_POSTFILTERED", postfiltered)
    reg = Registry.open(tmp_path / "registry")
    vectors = unit(40, 1)
    add_rows(reg, vectors, [f"w{i} common" for i in range(40)], ["FLUX.1-dev", "other"] * 20, weights=vectors)
    reg.maintain()
    hits = reg.search("common", k=30, base_model="other", encoder=FixedEncoder(vectors[0]))
    assert len(hits) == 20 and {h.base_model for h in hits} == {"other"}
    reg.loras.update(where="lora_id IN ('lora-00000001', 'lora-00000003')", values={"removed": True})
    for channel in search.CHANNELS:
        hits = reg.search("w1 common", k=38, channel=channel, encoder=FixedEncoder(vectors[1]))
        assert len(hits) == 38 and {"lora-00000001", "lora-00000003"}.isdisjoint(h.lora_id for h in hits), channel
        hits = reg.search("w1", k=40, channel=channel, encoder=FixedEncoder(vectors[1]), include_removed=True)
        assert "lora-00000001" in {h.lora_id for h in hits}, channel
        hits = reg.search("w1 common", k=40, channel=channel, base_model="other", encoder=FixedEncoder(vectors[1]))
        assert len(hits) == 18 and {h.base_model for h in hits} == {"other"}, channel
        hits = reg.search("common", k=5, channel=channel, where="lora_id IN ('lora-00000004', 'lora-00000006')",
                          encoder=FixedEncoder(vectors[4]))
        assert {h.lora_id for h in hits} == {"lora-00000004", "lora-00000006"}, channel
    assert reg.search_by_vector(vectors[1], k=1)[0].lora_id != "lora-00000001"
    assert len(reg.search_by_vector(vectors[1], k=40)) == 38


def test_indexed_search_loads_the_index_and_needs_no_rerank(tmp_path, monkeypatch):
    """Past VECTOR_INDEX_MIN_ROWS (lowered here) maintain() builds the IVF-HNSW-SQ index; a newly
    opened registry loads it whole into LanceDB's index cache before its first query, and the
    int8 codes alone give recall@10 >= 0.95 on clustered vectors."""
    monkeypatch.setattr(search, "VECTOR_INDEX_MIN_ROWS", 500)
    monkeypatch.setattr(search, "VECTOR_PARTITION_ROWS", 300)
    assert search.ANN_REFINE is None
    rng = np.random.default_rng(2)
    centres = unit(30, 3)
    vectors = centres[rng.integers(0, 30, 900)] + 0.05 * rng.standard_normal((900, TEXT_DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    reg = Registry.open(tmp_path / "registry")
    add_rows(reg, vectors, [f"synthetic lora {i}" for i in range(900)], ["FLUX.1-dev", "tiny-flux"] * 450)
    reg.maintain()
    index = next(i for i in reg.loras.list_indices() if "text_vector" in i.columns)
    assert index.index_type == "IvfHnswSq"

    before = search._get_session().size_bytes
    fresh = Registry.open(reg.root, version=reg.version)  # a new view (and Searcher) of it
    fresh._searcher.warm(wait=True)
    assert search._get_session().size_bytes - before > 900 * TEXT_DIM  # the int8 codes, at least
    found = 0
    for i in range(20):
        query = vectors[i] + 0.05 * rng.standard_normal(TEXT_DIM).astype(np.float32)
        exact = {f"lora-{j:08d}" for j in np.argsort(-(vectors @ query))[:10]}
        found += len({h.lora_id for h in fresh.search_by_vector(query, k=10)} & exact)
    assert found >= 190
    hits = fresh.search_by_vector(vectors[3], k=5, base_model="tiny-flux")
    assert hits and all(h.base_model == "tiny-flux" for h in hits)
    assert fresh.search_by_vector(vectors[4], k=1)[0].score == pytest.approx(1.0, abs=0.02)
    assert len(fresh.search_by_vector(vectors[3], k=100)) == 100  # k beyond ANN_EF
    assert len(fresh.search("synthetic lora", k=3, encoder=FixedEncoder(vectors[5]))) == 3


def test_query_vectors_equal_the_ones_stored_at_ingest(tmp_path):
    """A prompt equal to a LoRA's search text embeds (in search) to the vector ingest stored."""
    from flux_fixtures import flux_lora, partial_names

    from models.text_encoder import default_text_encoder
    from registry.lora.formats import save_lora

    folder = tmp_path / "loras"
    folder.mkdir()
    save_lora(folder / "ember_glow.safetensors", flux_lora(partial_names((0,), (), attention_only=True), rank=2),
              "diffusers", metadata={"ss_output_name": "ember glow, warm campfire light"})
    reg = Registry.open(tmp_path / "registry")
    reg.add([folder])
    row = reg.loras.to_arrow().to_pylist()[0]
    query = default_text_encoder().encode([row["search_text"]])[0]
    stored = np.asarray(row["text_vector"], dtype=np.float32)
    assert float(query @ stored / np.linalg.norm(stored)) >= 0.9999
    hit = reg.search(row["search_text"], k=1, channel="text")[0]
    assert hit.lora_id == row["lora_id"] and hit.score == pytest.approx(1.0)  # first in both lists


def test_empty_registry_and_a_failing_encoder(tmp_path):
    reg = Registry.open(tmp_path / "registry")
    for channel in ("hybrid", "text"):
        assert reg.search("anything", channel=channel, encoder=FixedEncoder(unit(1, 0)[0])) == []
    with pytest.raises(search.NoWeightEncoder, match="no LoRA-weight encoder is active"):
        reg.search("anything", channel="weights", encoder=FixedEncoder(unit(1, 0)[0]))

    class Broken:
        def encode(self, texts, batch_size=64):
            raise RuntimeError("no model")

    add_rows(reg, unit(3, 0), ["a", "b", "c"])
    reg.maintain()
    with pytest.raises(RuntimeError, match="no model"):
        reg.search("a", encoder=Broken())
    assert reg.search("a", k=1, encoder=FixedEncoder(unit(3, 0)[0]))[0].lora_id == "lora-00000000"


def test_listing_in_memory_follows_the_table(tmp_path, monkeypatch):
    """Hits are listed from memory only for the table version they were found in: a renamed
    LoRA shows its new name at once (read with the query), then from a reloaded listing."""
    monkeypatch.setattr(search, "LISTING_RELOAD_S", 0.0)
    reg = Registry.open(tmp_path / "registry")
    vectors = unit(30, 4)
    add_rows(reg, vectors, [f"w{i}" for i in range(30)], weights=vectors)
    reg.maintain()
    searcher = reg._searcher
    searcher.warm(wait=True)
    assert searcher._listing is not None and len(searcher._listing.row_ids) == 30
    before = {c: reg.search("w5", k=3, channel=c, encoder=FixedEncoder(vectors[5])) for c in search.CHANNELS}
    assert all(hits[0].lora_id == "lora-00000005" for hits in before.values())

    reg.loras.update(where="lora_id = 'lora-00000005'", values={"name": "renamed"})
    for channel in search.CHANNELS:
        hits = reg.search("w5", k=3, channel=channel, encoder=FixedEncoder(vectors[5]))
        assert hits[0].name == "renamed" and [h.lora_id for h in hits] == [h.lora_id for h in before[channel]]
    async def reloaded():  # the reload the searches above started, on the search loop
        await searcher._reloading

    search._Loop.run(reloaded())
    assert searcher._listing.version == reg.version
    assert reg.search("w5", k=1, encoder=FixedEncoder(vectors[5]))[0].name == "renamed"

    listing = searcher._listing
    assert listing.hits(listing.row_ids[:2], [1.0, 0.5])[1].score == 0.5
    assert listing.hits(np.array([listing.row_ids.max() + 1], dtype=listing.row_ids.dtype), [1.0]) is None


def test_weight_channel_searches_only_the_active_encoder_version(tmp_path):
    """The weight list holds vectors of the active encoder version only; hybrid fuses three lists
    (score 1.0 = first in all three); a registry pinned before the switch has no weight channel."""
    reg = Registry.open(tmp_path / "registry")
    vectors = unit(20, 5)
    add_rows(reg, vectors, [f"w{i}" for i in range(20)])
    reg.tag("before")
    reg.loras.delete("true")
    add_rows(reg, vectors, [f"w{i}" for i in range(20)], weights=vectors, encoder_version="v1")
    reg.maintain()
    reg.loras.update(where="lora_id = 'lora-00000002'", values={"encoder_version": "v0"})  # a stale row
    hits = reg.search("w2", k=20, channel="weights", encoder=FixedEncoder(vectors[2]))
    assert len(hits) == 19 and "lora-00000002" not in {h.lora_id for h in hits}
    assert hits[0].score == pytest.approx(max(float(vectors[i] @ vectors[2]) for i in range(20) if i != 2), abs=1e-5)
    top = reg.search("w3", k=3, channel="hybrid", encoder=FixedEncoder(vectors[3]))
    assert top[0].lora_id == "lora-00000003" and top[0].score == pytest.approx(1.0, abs=1e-6)
    assert all(h.score <= 2 / 3 + 1e-6 for h in top[1:])  # first in at most two of the three lists
    pinned = Registry.open(reg.root, version="before")
    with pytest.raises(search.NoWeightEncoder):
        pinned.search("w3", channel="weights", encoder=FixedEncoder(vectors[3]))
    assert pinned.search("w3", k=1, encoder=FixedEncoder(vectors[3]))[0].lora_id == "lora-00000003"


def test_loras_known_only_by_a_hash_are_found_by_their_weights_not_by_text_noise(tmp_path):
    """The no-metadata setting: rows whose text names nothing have no text vector, so the text
    channel does not rank them (full text still finds one by its hash) and hybrid ranks them as the
    weight channel does; rows with text beside them are ranked as before."""
    reg = Registry.open(tmp_path / "registry")
    weights, texts = unit(30, 7), unit(30, 8)
    hashed = [f"{i:02d}3fa9c1b2e4d5a6" for i in range(20)]
    texts[:20] = np.nan
    add_rows(reg, texts, hashed + [f"w{i}" for i in range(20, 30)], weights=weights, encoder_version="v1")
    reg.maintain()
    query = FixedEncoder(weights[4])
    by_weights = [h.lora_id for h in reg.search("a jade pyramid", k=30, channel="weights", encoder=query)]
    hybrid = [h.lora_id for h in reg.search("a jade pyramid", k=30, channel="hybrid", encoder=query) if h.score > 0]
    text = [h.lora_id for h in reg.search("a jade pyramid", k=30, channel="text", encoder=query)]
    assert hybrid[0] == by_weights[0] == "lora-00000004"
    hashed_hits = [i for i in hybrid if i < "lora-00000020"]  # those above the weight list's average
    assert len(hashed_hits) > 3 and hashed_hits == [i for i in by_weights if i < "lora-00000020"][:len(hashed_hits)]
    assert text and all(i >= "lora-00000020" for i in text)
    assert [h.lora_id for h in reg.search(hashed[7], k=1, channel="text", encoder=query)] == ["lora-00000007"]


def test_an_empty_prompt_or_an_unknown_base_model_is_an_argument_error(tmp_path):
    """Both raise ``ValueError`` (the CLI's one-line usage errors); a known base without LoRAs (a
    built-in or registered one) is an empty result; the weight channel without an encoder for the
    filtered base raises ``NoWeightEncoder`` as it does unfiltered."""
    from registry.lora.base_models import BaseModel

    reg = Registry.open(tmp_path / "registry")
    vectors = unit(6, 6)
    add_rows(reg, vectors, [f"w{i}" for i in range(6)], ["FLUX.1-dev"] * 3 + ["sdxl"] * 3, weights=vectors)
    reg.maintain()
    encoder = FixedEncoder(vectors[4])
    for prompt in ("", " \n\t"):
        with pytest.raises(ValueError, match="empty prompt"):
            reg.search(prompt, encoder=encoder)
    for channel in search.CHANNELS:
        with pytest.raises(ValueError, match="unknown base model 'nothing'; known: FLUX.1-dev, FLUX.1-schnell, sdxl$"):
            reg.search("w4", channel=channel, base_model="nothing", encoder=encoder)
    reg.register_base(BaseModel("mine", "flux", {"proj": (4, 4)}))
    for base in ("FLUX.1-schnell", "mine"):
        assert reg.search("w4", base_model=base, encoder=encoder) == []
        with pytest.raises(search.NoWeightEncoder, match=f"active in this registry for {base}"):
            reg.search("w4", channel="weights", base_model=base, encoder=encoder)
    assert reg.search("w4", base_model="sdxl", where="lora_id = 'none'", encoder=encoder) == []
    assert reg.search("w4", k=1, base_model="sdxl", encoder=encoder)[0].lora_id == "lora-00000004"
    for base, top in (("FLUX.1-dev", "lora-00000001"), ("sdxl", "lora-00000004")):  # each base its encoder's
        hits = reg.search("w", k=1, channel="weights", base_model=base, encoder=FixedEncoder(vectors[int(top[-1])]))
        assert hits[0].lora_id == top
