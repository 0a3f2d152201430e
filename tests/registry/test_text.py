"""Text vectors of search documents: the unit mean of their lines' vectors."""

from __future__ import annotations

import numpy as np

from models.text_encoder import default_text_encoder
from registry.text import MAX_TEXTS, document_texts, embed_documents, names_something


def test_document_texts_are_distinct_stripped_lines_capped():
    assert document_texts("red square\n\n  rdsqr \nred square\nhatched style") == ["red square", "rdsqr", "hatched style"]
    assert document_texts("") == []
    lines = [f"tag {i}" for i in range(MAX_TEXTS + 10)]
    texts = document_texts("\n".join(lines))
    assert len(texts) == MAX_TEXTS and texts[:-1] == lines[:MAX_TEXTS - 1]
    assert texts[-1] == " ".join(lines[MAX_TEXTS - 1:])


def test_a_documents_vector_is_the_unit_mean_of_its_lines():
    document = "red square\nrdsqr\na red square on a dotted background, hatched style"
    [vector] = embed_documents([document])
    mean = default_text_encoder().encode(document_texts(document)).mean(axis=0)
    assert np.allclose(vector, mean / np.linalg.norm(mean), atol=1e-5)
    assert embed_documents([]) == []



def test_a_line_shared_by_documents_is_embedded_once(monkeypatch):
    """Tags and base-model names repeat across a folder's LoRAs: each distinct line is encoded once,
    and every document's vector is what it is alone."""
    import registry.text as text

    documents = ["pixel art\nsolo\nknight in armour", "solo\npixel art\nfox in the snow", "solo", "0123abcd4567"]
    alone = [embed_documents([d])[0] for d in documents]
    encoded, encode = [], text._encode
    monkeypatch.setattr(text, "_encode", lambda lines: encoded.append(list(lines)) or encode(lines))
    monkeypatch.setattr(text, "_kept", {})  # none kept from the calls above
    together = embed_documents(documents)
    assert encoded == [["pixel art", "solo", "knight in armour", "fox in the snow"]]
    assert together[3] is None and alone[3] is None
    for a, b in zip(together[:3], alone[:3]):
        assert np.allclose(a, b, atol=1e-6)


def test_lines_embedded_lately_are_not_embedded_again(monkeypatch):
    """A folder's later batches (and each file whose vector is made beside its copy) share tags
    with the earlier ones: the last LINES_KEPT lines used are kept, the least recently used go."""
    import registry.text as text

    encoded, encode = [], text._encode
    monkeypatch.setattr(text, "_encode", lambda lines: encoded.append(list(lines)) or encode(lines))
    monkeypatch.setattr(text, "_kept", {})
    monkeypatch.setattr(text, "LINES_KEPT", 3)
    first = embed_documents(["pixel art\nsolo\nknight"])[0]
    assert np.allclose(embed_documents(["solo\npixel art\nknight"])[0], first, atol=1e-6)
    assert encoded == [["pixel art", "solo", "knight"]]
    embed_documents(["fox\nsolo"])  # solo used again, fox new: pixel art is the least recently used
    assert encoded[-1] == ["fox"] and list(text._kept) == ["knight", "solo", "fox"]
    embed_documents(["pixel art\nknight"])
    assert encoded[-1] == ["pixel art"]

def test_words_past_the_encoders_window_still_count():
    """A kohya tag list longer than the encoder's 256 tokens used to hide the captions after it."""
    tags = "\n".join(f"masterpiece, best quality, highres, detailed background number {i}" for i in range(40))
    without = embed_documents([tags])[0]
    with_fox = embed_documents([tags + "\na watercolor fox in the snow"])[0]
    query = default_text_encoder().encode(["a watercolor fox in the snow"])[0]
    assert float(np.dot(with_fox, query)) > float(np.dot(without, query)) + 0.005


def test_hashes_ids_numbers_and_default_file_names_name_nothing():
    for line in ("3fa9c1b2e4d5a6b7", "A1B2C3D4-E5F6-7890-ABCD-EF0123456789", "0f_1e_2d_3c", "12345", "2024-05-01",
                 "pytorch_lora_weights", "adapter_model", "last", "last-000010", "  ", "--"):
        assert not names_something(line), line
    for line in ("red square", "ohwx", "v2", "lora_003", "facade", "deadbeefcafe", "last supper", "x"):
        assert names_something(line), line


def test_a_document_that_names_nothing_has_no_vector():
    """A LoRA known only by its file's hash: no text vector (its text would match by noise alone);
    a hash beside real lines leaves the vector of the real lines."""
    assert embed_documents(["3fa9c1b2e4d5a6b7", "", "red square"])[:2] == [None, None]
    named, hashed = embed_documents(["red square\nhatched style", "3fa9c1b2e4d5a6b7\nred square\nhatched style"])
    assert np.allclose(named, hashed)


def test_a_lora_ingested_under_its_hash_has_no_text_vector_and_no_text_match(tmp_path):
    """End to end: the hash-named file gets no text vector, so an unrelated query's text channel
    returns only the named LoRA (before, the hash's vector ranked it by noise); full text finds it by name."""
    from flux_fixtures import flux_lora, partial_names

    from registry import Registry
    from registry.lora.formats import save_lora

    folder = tmp_path / "loras"
    folder.mkdir()
    for seed, stem in enumerate(("3fa9c1b2e4d5a6b7", "red-square-style")):
        save_lora(folder / f"{stem}.safetensors",
                  flux_lora(partial_names((seed,), (), attention_only=True), rank=2, seed=seed), "diffusers")
    reg = Registry.open(tmp_path / "registry")
    assert len(reg.add([folder]).added) == 2
    vectors = {r["name"]: r["text_vector"] for r in reg.rows(reg.loras, None, 2, ["name", "text_vector"])}
    assert vectors["3fa9c1b2e4d5a6b7"] is None and vectors["red-square-style"] is not None
    assert [h.name for h in reg.search("a blue circle", k=5, channel="text")] == ["red-square-style"]
    assert reg.search("3fa9c1b2e4d5a6b7", k=1, channel="text")[0].name == "3fa9c1b2e4d5a6b7"
