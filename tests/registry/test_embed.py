"""The weight channel's embeddings: zero-shot at ingest, one switch per encoder version,
incremental refresh, pinned views keep the encoder they were tagged with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flux_fixtures import flux_lora, tiny_flux_base

from models.encoder import EncoderConfig, LoRAWeightEncoder
from models.encoder_tokens import LayerSpec
from registry import NoWeightEncoder, Registry
from registry.lora.formats import save_lora
from registry.lora.inspect import load_canonical

CONFIG = EncoderConfig.ours(width=32, depth=1, heads=2, probes=2, probe_dim=8, dropout=0.0)


def _encoder(tmp_path: Path, version: str, seed: int) -> Path:
    base = tiny_flux_base()
    torch.manual_seed(seed)
    encoder = LoRAWeightEncoder([LayerSpec(n, d, k) for n, (d, k) in base.layer_shapes.items()], CONFIG)
    path = tmp_path / f"{version}.safetensors"
    encoder.save(path, version, {"base_model": base.name, "pool": []})
    return path


def _lora_file(folder: Path, name: str, seed: int, blocks: tuple[int, ...] = (0, 1)) -> Path:
    base = tiny_flux_base()
    names = [n for n in base.layer_shapes if n.startswith(tuple(f"transformer_blocks.{b}." for b in blocks))]
    path = folder / f"{name}.safetensors"
    save_lora(path, flux_lora(names, rank=2, seed=seed, base=base), "diffusers",
              metadata={"ss_output_name": name.replace("_", " "), "ss_base_model_version": "flux1"})
    return path


def _vectors(reg: Registry) -> dict[str, tuple[str, np.ndarray]]:
    rows = reg.loras.to_arrow().select(["lora_id", "encoder_version", "weight_vector"]).to_pylist()
    return {r["lora_id"]: (r["encoder_version"], np.asarray(r["weight_vector"] or [], np.float32)) for r in rows}


def _assert_the_encoders_own_vectors(reg: Registry, checkpoint: Path, version: str) -> None:
    """Every row carries ``version``'s vector, the one the encoder's own pass over its stored blob gives."""
    encoder = LoRAWeightEncoder.load(checkpoint)
    for lora_id, (stored_version, vector) in _vectors(reg).items():
        lora, _ = load_canonical(reg.root / reg.get(lora_id)["blob"])
        with torch.no_grad():
            expected = encoder([lora.factors])[0].numpy()
        assert stored_version == version and np.allclose(vector, expected, atol=1e-5)


def test_embeddings_follow_the_active_encoder(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    for i, name in enumerate(("ember_glow", "ocean_waves", "pencil_sketch")):
        _lora_file(folder, name, seed=i)
    reg = Registry.open(tmp_path / "registry")
    reg.register_base(tiny_flux_base())
    reg.add([folder])
    assert all(v is None for v, _ in _vectors(reg).values())  # no encoder yet: no weight vectors
    with pytest.raises(NoWeightEncoder):
        reg.search("glow", channel="weights")
    assert reg.search("ember glow", k=1, channel="hybrid")[0].name == "ember glow"  # text lists only

    first = _encoder(tmp_path, "enc-a", seed=0)
    report = reg.register_encoder(first)
    assert report.activated == "enc-a" and report.embedded == {"enc-a": 3}
    _assert_the_encoders_own_vectors(reg, first, "enc-a")
    hits = reg.search("anything", k=3, channel="weights")
    assert len(hits) == 3 and all(-1.0 <= h.score <= 1.0 for h in hits)
    reg.tag("with-a")

    _lora_file(folder, "misty_harbour", seed=7, blocks=(1,))  # partial coverage, arrives later
    added = reg.add([folder])
    new_id = added.added[0]["lora_id"]
    assert _vectors(reg)[new_id][0] == "enc-a"  # embedded at ingest, without retraining

    second = _encoder(tmp_path, "enc-b", seed=1)
    report = reg.register_encoder(second)
    assert report.activated == "enc-b" and report.embedded == {"enc-b": 4}
    assert {v for v, _ in _vectors(reg).values()} == {"enc-b"}
    assert {r.version: r.active for r in reg.encoder_versions()} == {"enc-a": False, "enc-b": True}
    assert reg.register_encoder(second).embedded == {"enc-b": 0}  # registering again: nothing to do

    reg.loras.update(where=f"lora_id = '{new_id}'", values={"encoder_version": "enc-a"})  # a straggler
    assert len(reg.search("anything", k=10, channel="weights")) == 3  # never ranked beside enc-b
    assert reg.refresh_embeddings().embedded == {"enc-b": 1}
    assert len(reg.search("anything", k=10, channel="weights")) == 4

    pinned = Registry.open(reg.root, version="with-a")  # read-only view with enc-a active
    assert len(pinned.search("anything", k=10, channel="weights")) == 3
    assert [r.version for r in pinned.encoder_versions() if r.active] == ["enc-a"]


def test_a_registry_of_format_2_is_upgraded_in_place(tmp_path):
    import json

    from registry.store.schema import WEIGHT_COLUMNS

    reg = Registry.open(tmp_path / "registry")
    reg.loras.drop_columns([f.name for f in WEIGHT_COLUMNS])  # what a format-2 registry holds
    (reg.root / "registry.json").write_text(json.dumps({"format": 2}))
    with pytest.raises(Exception, match="open it for writing once"):
        Registry.open(reg.root, version=1)
    upgraded = Registry.open(reg.root)
    assert {f.name for f in WEIGHT_COLUMNS} <= set(upgraded.loras.schema.names)
    assert json.loads((reg.root / "registry.json").read_text())["format"] == 3


def test_an_encoder_is_read_once_per_process_until_its_file_changes(tmp_path):
    from registry.embed import load_encoder
    from registry.store.encoders import EncoderRecord

    record = EncoderRecord("enc-a", "base", _encoder(tmp_path, "enc-a", seed=0), {}, True)
    model = load_encoder(record)
    assert load_encoder(record) is model and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    factors = load_canonical(_lora_file(tmp_path, "ember_glow", seed=0))[0].factors
    fresh = LoRAWeightEncoder.load(record.path)
    with torch.no_grad():
        torch.testing.assert_close(model([factors]), fresh([factors]))
    _encoder(tmp_path, "enc-a", seed=1)  # the same path rewritten
    assert load_encoder(record) is not model


def test_ingest_and_re_embedding_start_from_the_responses_inspection_made(tmp_path, monkeypatch):
    """Neither an ingest nor a re-embedding runs the encoder's own pass over the factors: the
    layers' responses to its probes come from the fingerprint's pass (one read of the factors), and
    the vectors are the ones the encoder's own pass gives."""
    from models.encoder_tokens import LayerTokenizer

    folder = tmp_path / "loras"
    folder.mkdir()
    early = _lora_file(folder, "ember_glow", seed=0)
    reg = Registry.open(tmp_path / "registry")
    reg.register_base(tiny_flux_base())
    reg.add([early])
    path = _encoder(tmp_path, "enc-a", seed=0)

    def refused(*args, **kwargs):
        raise AssertionError("the encoder read the factors again")

    monkeypatch.setattr(LayerTokenizer, "_responses_t", refused)
    assert reg.register_encoder(path).embedded == {"enc-a": 1}  # a row stored before the encoder
    report = reg.add([_lora_file(folder, "ocean_waves", seed=1, blocks=(1,))])  # one arriving after
    assert len(report.added) == 1 and not report.rejected
    monkeypatch.undo()
    _assert_the_encoders_own_vectors(reg, path, "enc-a")


def test_a_damaged_encoder_checkpoint_is_said_once_and_loses_no_lora(tmp_path):
    """The registry's own encoder file missing or damaged is not the LoRAs' fault: they are added
    (without a weight vector) and the report says once what to do; once the file is back,
    ``refresh_embeddings`` embeds them."""
    import shutil

    folder = tmp_path / "loras"
    folder.mkdir()
    reg = Registry.open(tmp_path / "registry")
    reg.register_base(tiny_flux_base())
    source = _encoder(tmp_path, "enc-a", seed=0)
    reg.register_encoder(source)
    stored = next((reg.root / "encoders").glob("enc-a.safetensors"))
    for round_, damage in enumerate(("missing", "garbage")):
        stored.unlink() if damage == "missing" else stored.write_bytes(b"not a checkpoint" * 64)
        files = [_lora_file(folder, f"{damage}_{i}", seed=10 + 2 * round_ + i) for i in range(2)]
        report = reg.add(files)
        assert len(report.added) == 2 and not report.rejected, report.to_dict()
        assert len(report.warnings) == 1 and "enc-a" in report.warnings[0] and "autolora embed" in report.warnings[0]
        assert not reg.rejections.count_rows()
    assert all(version is None for version, _ in _vectors(reg).values())
    shutil.copyfile(source, stored)
    assert reg.refresh_embeddings().embedded == {"enc-a": 4}
    assert {version for version, _ in _vectors(reg).values()} == {"enc-a"}
