"""Text vectors of search documents: the unit mean of their lines' vectors."""

from __future__ import annotations

import numpy as np

from models.text_encoder import default_text_encoder
from registry.text import MAX_TEXTS, document_texts, embed_documents


def test_document_texts_are_distinct_stripped_lines_capped():
    assert document_texts("red square\n\n  rdsqr \nred square\nhatched style") == ["red square", "rdsqr", "hatched style"]
    assert document_texts("") == [""]
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


def test_words_past_the_encoders_window_still_count():
    """A kohya tag list longer than the encoder's 256 tokens used to hide the captions after it."""
    tags = "\n".join(f"masterpiece, best quality, highres, detailed background number {i}" for i in range(40))
    without = embed_documents([tags])[0]
    with_fox = embed_documents([tags + "\na watercolor fox in the snow"])[0]
    query = default_text_encoder().encode(["a watercolor fox in the snow"])[0]
    assert float(np.dot(with_fox, query)) > float(np.dot(without, query)) + 0.005
