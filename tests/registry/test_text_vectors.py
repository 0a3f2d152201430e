"""Remaking stored text vectors with the current text recipe (``autolora embed --text``)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
from flux_fixtures import flux_lora, partial_names

import registry.text_vectors as text_vectors
from models.text_encoder import default_text_encoder
from registry import Registry
from registry.lora.formats import save_lora
from registry.text import embed_documents


def _registry(tmp_path) -> tuple[Registry, str, str]:
    folder = tmp_path / "loras"
    folder.mkdir()
    for i, stem in enumerate(("ember_glow", "3fa9c1b2e4d5a6b7")):
        save_lora(folder / f"{stem}.safetensors",
                  flux_lora(partial_names((i,), (), attention_only=True), rank=2, seed=900 + i), "diffusers")
    reg = Registry.open(tmp_path / "registry")
    reg.add([folder])
    named, hashed = (reg.rows(reg.loras, f"name = '{n}'", 1)[0]["lora_id"] for n in ("ember_glow", "3fa9c1b2e4d5a6b7"))
    return reg, named, hashed


def _vectors(reg: Registry) -> dict:
    return {r["lora_id"]: r["text_vector"] for r in reg.column_rows(reg.loras, ["lora_id", "text_vector"])}


def _write_vectors(reg: Registry, vectors: dict) -> None:
    schema = pa.schema([reg.loras.schema.field(n) for n in ("lora_id", "text_vector")])
    data = pa.Table.from_pylist([{"lora_id": k, "text_vector": v} for k, v in vectors.items()], schema=schema)
    reg.loras.merge_insert("lora_id").when_matched_update_all().execute(data)


def _one_pass(text: str) -> list[float]:
    vector = default_text_encoder().encode([text])[0]
    return (vector / np.linalg.norm(vector)).tolist()


def test_rows_written_by_an_older_recipe_get_the_current_vectors_in_one_commit(tmp_path, capsys):
    reg, named, hashed = _registry(tmp_path)
    current = _vectors(reg)
    assert current[hashed] is None and current[named] is not None
    docs = {r["lora_id"]: r["search_text"] for r in reg.column_rows(reg.loras, ["lora_id", "search_text"])}
    # as older versions left them: the hash embedded like any text, another recipe's vector for the name
    _write_vectors(reg, {hashed: _one_pass(docs[hashed]), named: _one_pass(docs[named] + " (an older recipe)")})
    assert _vectors(reg)[hashed] is not None

    before = reg.version
    report = reg.refresh_text_vectors()
    assert report.to_dict() == {"rows": 2, "changed": 2, "without_vector": 1}
    assert reg.version == before + 1
    remade = _vectors(reg)
    assert remade[hashed] is None
    assert np.allclose(remade[named], embed_documents([docs[named]])[0], atol=1e-6)
    assert reg.search("ember glow", k=1, channel="text")[0].lora_id == named

    from pipelines import cli

    assert cli.main(["embed", "--registry", str(reg.root), "--text", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"rows": 2, "changed": 0, "without_vector": 1}
    assert Registry.open(reg.root).version == before + 1  # nothing changed: no commit


def test_a_row_whose_text_changed_meanwhile_keeps_the_other_writers_vector(tmp_path, monkeypatch):
    reg, named, _ = _registry(tmp_path)
    docs = {r["lora_id"]: r["search_text"] for r in reg.column_rows(reg.loras, ["lora_id", "search_text"])}
    _write_vectors(reg, {named: _one_pass(docs[named] + " (an older recipe)")})
    theirs = embed_documents(["ember glow\na campfire at night"])[0]

    def embed_while_another_writer_refreshes(documents):
        schema = pa.schema([reg.loras.schema.field(n) for n in ("lora_id", "search_text", "text_vector")])
        other = [{"lora_id": named, "search_text": "ember glow\na campfire at night", "text_vector": theirs}]
        reg.loras.merge_insert("lora_id").when_matched_update_all().execute(pa.Table.from_pylist(other, schema=schema))
        return embed_documents(documents)

    monkeypatch.setattr(text_vectors, "embed_documents", embed_while_another_writer_refreshes)
    reg.refresh_text_vectors()
    assert np.allclose(_vectors(reg)[named], theirs, atol=1e-6)
